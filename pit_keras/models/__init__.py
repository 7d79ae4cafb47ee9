"""Networks: backbone registry, classifier heads, the PIT network with a fine and K coarse outputs."""
