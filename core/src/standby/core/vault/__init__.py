"""The recovery vault: passphrase-sealed, deduplicated recovery points in a store of the
operator's choice (a directory, S3, Azure block blobs), and the `vault` target on top."""
