"""Weight interop with other libraries. Nothing here is imported by training code; the
diffusers package is only imported inside the functions that need it."""
