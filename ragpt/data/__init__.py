"""Documents in, chunks out: loaders and chunking, ingest, QA files, dataset importers, the sample corpus."""
