"""Tensor-level operations. Each fast function has a `<op>_ref` twin written the plain way (tests only)."""
