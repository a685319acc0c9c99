"""The numeric contract: the constants the eager model, the exported graph, packing and the
Session must agree on (docs/MODEL.md). Plain numbers, importable without torch."""

# LayerNorm epsilons: the timm backbone's, and PyTorch's default used by experts, the shared
# expert and perceptors.
BACKBONE_LN_EPS = 1e-6
PART_LN_EPS = 1e-5

# The reference's guard inside the log of every entropy (routing and iterative prediction).
ENTROPY_EPS = 1e-10

# F.normalize's epsilon: the cosine head divides by max(||x||, NORM_EPS).
NORM_EPS = 1e-12

# Probabilities are softmax(COS_SCALE * cos) over the learned classes (docs/MODEL.md,
# "Single-pass inference"); also the default scale s of the angular loss and alignment.
COS_SCALE = 20.0

# What the reference writes into router logits that lose the top-K selection (e^-100 ~ 0).
MASKED_LOGIT = -100.0

# Perceptor logits of padded classes: exp(-1e30 - max) is exactly 0 in the softmax, and unlike
# -inf an all-padding (unused) slot still gives finite numbers.
PAD_LOGIT = -1e30
