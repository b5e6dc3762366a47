"""Networks: small MLPs and Koh & Liang's CNN, the vision models of Table 1, and pretrained ImageNet ResNets."""
