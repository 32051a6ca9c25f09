"""The model owner's sealing: a run's stage graphs encrypted into a bundle (``model.btee``)."""
