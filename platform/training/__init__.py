"""What every training method shares below the search algorithms: the one loss / backward / optimizer step (`step`)
and the accuracy of a batch or a split, BatchNorm recalibration and replica statistics (`evaluation`)."""
