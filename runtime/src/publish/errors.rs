//! What a producer error means: librdkafka's classes (retriable,
//! permanent, fatal), refusals for size or inside a transaction, and the
//! hint a fenced transactional producer halts with.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// What a producer error means for the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Send it again: the cause can pass.
    Retriable,
    /// Sending it again gives the same answer.
    Permanent,
    /// The producer cannot go on (e.g. its idempotence state is broken).
    Fatal,
}

/// Classes a producer error by librdkafka's code.
pub fn classify(err: &KafkaError) -> ErrorClass {
    use RDKafkaErrorCode as C;
    let Some(code) = err.rdkafka_error_code() else {
        return ErrorClass::Retriable;
    };
    match code {
        C::Fatal => ErrorClass::Fatal,
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::MessageBatchTooLarge
        | C::InvalidRecord
        | C::UnknownTopic
        | C::UnknownPartition
        | C::InvalidTopic
        | C::TopicAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::PolicyViolation
        | C::UnsupportedForMessageFormat
        | C::InvalidRequiredAcks
        | C::InvalidArgument => ErrorClass::Permanent,
        _ => ErrorClass::Retriable,
    }
}

/// Whether a delivery that failed in a transaction was refused for good:
/// a permanent error, or a topic still unknown after librdkafka's wait for
/// its metadata (`topic.metadata.propagation.max.ms`).
pub fn refused_in_transaction(err: &KafkaError) -> bool {
    classify(err) == ErrorClass::Permanent
        || err.rdkafka_error_code() == Some(RDKafkaErrorCode::UnknownTopicOrPartition)
}

/// Whether a permanent refusal may be the fault of the record's batch-mates.
pub fn refused_for_size(err: &KafkaError) -> bool {
    matches!(
        err.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge)
    )
}

/// What a transactional producer fenced by another one means, for the
/// reason a runtime halts with.
pub fn fenced_hint(code: RDKafkaErrorCode, transactional_id: Option<&str>) -> String {
    use RDKafkaErrorCode as C;
    match (code, transactional_id) {
        (C::Fenced | C::ProducerFenced | C::InvalidProducerEpoch, Some(id)) => format!(
            " (another instance started with transactional id {id:?}: each instance needs its own \
             delivery.transactional_id; this one stops and commits nothing more)"
        ),
        _ => String::new(),
    }
}
