use super::*;
use crate::metrics::Health;

#[test]
fn size_topic_and_permission_errors_are_permanent() {
    for code in [
        RDKafkaErrorCode::MessageSizeTooLarge,
        RDKafkaErrorCode::UnknownTopic,
        RDKafkaErrorCode::TopicAuthorizationFailed,
        RDKafkaErrorCode::PolicyViolation,
    ] {
        let e = KafkaError::MessageProduction(code);
        assert_eq!(classify(&e), ErrorClass::Permanent, "{code:?}");
    }
    for code in [
        RDKafkaErrorCode::MessageTimedOut,
        RDKafkaErrorCode::NotLeaderForPartition,
        RDKafkaErrorCode::UnknownTopicOrPartition,
        RDKafkaErrorCode::AllBrokersDown,
    ] {
        let e = KafkaError::MessageProduction(code);
        assert_eq!(classify(&e), ErrorClass::Retriable, "{code:?}");
    }
    assert_eq!(
        classify(&KafkaError::MessageProduction(RDKafkaErrorCode::Fatal)),
        ErrorClass::Fatal
    );
}

/// A fatal producer error (injected with librdkafka's test hook on the
/// mock cluster) halts the runtime with the reason, and readiness says so.
#[tokio::test]
async fn a_fatal_producer_error_halts_the_runtime() {
    let mock = rdkafka::mocking::MockCluster::new(1).expect("a mock cluster");
    let config = Config::parse(&format!(
        "[kafka]\nbrokers = {:?}\ngroup_id = \"g\"\n\n[[handler]]\nname = \"h\"\nwasm = \"h.wasm\"\ntopics = [\"t\"]\n",
        mock.bootstrap_servers()
    ))
    .expect("a config");
    let health = Arc::new(Health::default());
    let (halt, mut rx) = Halt::new(health.clone());
    let publisher = Publisher::new(&config, halt, None).expect("a publisher");
    let reason = std::ffi::CString::new("injected").unwrap();
    // SAFETY: the producer's native handle is live for this call.
    let rc = unsafe {
        rdkafka::bindings::rd_kafka_test_fatal_error(
            publisher.producer.client().native_ptr(),
            rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
            reason.as_ptr(),
        )
    };
    assert_eq!(
        rc,
        rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
    );
    // The error callback runs on the producer's poll thread.
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(Option::is_some))
        .await
        .expect("halted within 10 s")
        .expect("halt channel open");
    let why = health.not_ready().expect("not ready");
    assert!(why.contains("fatal error"), "{why}");
}
