"""Influence estimators behind one interface (:func:`make_estimator`)."""
