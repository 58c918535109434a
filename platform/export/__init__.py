"""Taking a model out of fliqs (`fliqs export`): a standalone PyTorch folder (`pytorch`: tracing, the folder and its
loader; its model.py is the template `model_template.py` with its placeholders filled), ONNX (`onnx`), and the one
error both raise (`errors`)."""
