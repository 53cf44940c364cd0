"""The report's sections, one module each, in the order the report shows them."""
