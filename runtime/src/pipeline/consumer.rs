//! The group's consumer as the stages below the poll loop use it: pause and
//! resume a partition, store an offset, the group's metadata for a
//! transaction; and how a partition is named. Its context (`group`: the rebalance callbacks) sits above
//! those stages, so they see this trait rather than the consumer's type.

use rdkafka::consumer::{Consumer, ConsumerContext, ConsumerGroupMetadata, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::TopicPartitionList;

/// A partition: its topic and number.
pub(super) type TopicPartition = (String, i32);

/// What the stages do with the group's consumer.
pub(super) trait GroupConsumer: Send + Sync {
    fn pause(&self, partitions: &TopicPartitionList) -> KafkaResult<()>;
    fn resume(&self, partitions: &TopicPartitionList) -> KafkaResult<()>;
    fn store_offset(&self, topic: &str, partition: i32, offset: i64) -> KafkaResult<()>;
    fn group_metadata(&self) -> Option<ConsumerGroupMetadata>;
}

impl<C: ConsumerContext + 'static> GroupConsumer for StreamConsumer<C> {
    fn pause(&self, partitions: &TopicPartitionList) -> KafkaResult<()> {
        Consumer::pause(self, partitions)
    }
    fn resume(&self, partitions: &TopicPartitionList) -> KafkaResult<()> {
        Consumer::resume(self, partitions)
    }
    fn store_offset(&self, topic: &str, partition: i32, offset: i64) -> KafkaResult<()> {
        Consumer::store_offset(self, topic, partition, offset)
    }
    fn group_metadata(&self) -> Option<ConsumerGroupMetadata> {
        Consumer::group_metadata(self)
    }
}

/// The key of a partition's problem in [`crate::metrics::Health`].
pub(super) fn partition_key(topic: &str, partition: i32) -> String {
    format!("partition {topic}/{partition}")
}
