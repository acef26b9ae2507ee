"""Analysis job: metrics, plots and a report from prediction files."""
