"""Model folding: cluster similar channels and merge them."""
