"""Sources, filters, stage chain, shard writer/reader and the sample-data generator."""
