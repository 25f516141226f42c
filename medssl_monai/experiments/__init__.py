"""The experiment drivers above the bundles: configs, running a bundle, reading its results, the
label-efficiency grid, and the pipeline, study and Transfusion drivers. Nothing here imports
:mod:`medssl_monai.reporting` or the command line (they sit above)."""
