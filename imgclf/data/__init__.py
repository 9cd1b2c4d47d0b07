"""The data path, from a source to batches: fetching tf_flowers, a folder or an archive
(``sources``), checking and copying its images into ``data/raw`` (``ingest``), decoding them one
way everywhere (``images``), the reviewed label fixes (``corrections``), the train/val/test split
(``split``), the decoded store read in batches from disk (``store``) and the splits as arrays and
batches for training and inference (``datasets``). Imports only the package's core modules."""
