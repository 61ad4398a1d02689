"""The benchmark harness: measuring (bench), running grids of measurements (sweep),
and reading them (analysis, plots). The core library does not import it; it needs
the ``harness`` extra (``pip install -e '.[harness]'``) beyond torch and ibm-fms."""
