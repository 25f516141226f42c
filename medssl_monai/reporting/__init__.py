"""What the drivers' runs are turned into: figures, markdown, one summary per driver, DICOM SR back to the
PACS. Reads :mod:`medssl_monai.experiments`' outputs; only the command line sits above."""
