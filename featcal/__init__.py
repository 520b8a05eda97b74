"""featcal: merge fine-tuned models, calibrate the merged model, evaluate and report."""

__version__ = "0.1.0"
