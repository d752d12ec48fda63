"""This machine and this install: hardware facts, the loaded llama.cpp library, `dsv4 doctor`."""
