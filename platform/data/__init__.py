"""The data sets (`datasets`): digits (embedded), CIFAR-10 and ImageNet / image folders from a path; metadata and
checks before any work, splits, loaders. Nothing is ever downloaded."""
