"""torchmetrics metrics: statistics that stay correct when summed across processes."""
