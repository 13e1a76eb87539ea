"""Integrations with other libraries: `nemokernels.integrations.transformers.patch(model)`."""
