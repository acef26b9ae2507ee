"""Training job: TFRecord shards -> CNN under tf.distribute."""
