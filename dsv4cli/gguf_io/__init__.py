"""GGUF files as dsv4 reads them: headers and recipe metadata (`read`), the pre-load checks (`check`)."""
