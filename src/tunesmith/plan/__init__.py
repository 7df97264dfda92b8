"""Will it fit: the memory model behind ``tunesmith estimate`` (``estimate.py``, its terms in ``terms.py``, the
model's sizes in ``shapes.py``) and the settings ``plan: auto`` chooses (``fit.py``). It reads configs only."""
