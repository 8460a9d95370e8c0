"""Model lists for the benchmarks, as data.

Names are timm model names (always built with ``pretrained=False``). Each list says why
it holds what it holds; the benchmark scripts pick one with ``--list NAME``.
"""

# The coverage list of the issue: one or two members of every architecture family timm
# ships, chosen for the structure they exercise rather than for accuracy.
ISSUE = (
    # residual CNNs: plain, grouped, squeeze-excite, multi-scale split, selective kernel, split attention
    "resnet18", "resnet50", "resnext50_32x4d", "seresnet50", "res2net50_14w_8s", "skresnet18", "resnest14d",
    "regnety_008",
    # concatenation and dual paths
    "densenet121", "dla34", "dpn68", "cspdarknet53",
    # plain stacks and re-parameterizable blocks
    "vgg11_bn", "repvgg_a0",
    # mobile: inverted residuals, SE, hard-swish, channel shuffle / ghost, NAS
    "mobilenetv2_100", "mobilenetv3_large_100", "efficientnet_b0", "tf_efficientnet_lite0", "efficientnetv2_rw_t",
    "mnasnet_100", "ghostnet_100", "rexnet_100",
    # multi-branch and multi-resolution
    "inception_v3", "hrnet_w18_small",
    # modern CNNs and metaformers
    "convnext_atto", "convnext_tiny", "poolformer_s12", "mobileone_s0", "fastvit_t8",
    # vision transformers: plain, distilled, rotary, class attention, conv-attention hybrids
    "vit_tiny_patch16_224", "vit_small_patch16_224", "deit_tiny_distilled_patch16_224", "eva02_tiny_patch14_224",
    "cait_xxs24_224", "levit_128", "mobilevit_xs", "efficientformer_l1", "pvt_v2_b0",
    # windowed / hierarchical attention
    "swin_tiny_patch4_window7_224", "maxvit_nano_rw_256", "coat_lite_tiny",
    # MLPs and masked-unit attention
    "mixer_s16_224", "resmlp_12_224", "hiera_tiny_224",
)

# A smoke subset that finishes in a few minutes on 2 CPU cores: one residual CNN, one
# mobile net with SE, one concat net, one metaformer, one ViT.
QUICK = (
    "resnet18",
    "mobilenetv3_large_100",
    "dla34",
    "convnext_atto",
    "vit_tiny_patch16_224",
)

LISTS = {"issue": ISSUE, "quick": QUICK}
