//! The two network architectures, written on candle: a residual MLP for vectors and a small
//! U-Net for images. Both map `(c_in·y, c_noise)` to the raw output `F` of the EDM
//! preconditioning (see [`super::Network`]); neither knows about schedules.

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, Linear, VarBuilder, conv2d, group_norm, linear};
use serde::{Deserialize, Serialize};

/// The architecture of a score network, as stored in its JSON description.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Architecture {
    /// A residual MLP for vectors: `h = W_in y`, then `blocks` residual blocks
    /// `h ← h + W₂ silu(W₁ silu(h) + W_t e(t))`, then `W_out silu(h)`.
    Mlp {
        /// Width of the hidden layers.
        hidden: usize,
        /// Number of residual blocks.
        blocks: usize,
        /// Width of the sinusoidal noise embedding (even).
        embedding: usize,
    },
    /// A small U-Net for `channels_in × height × width` images (row-major in the vector):
    /// two resolutions (`height × width` and half of it) with residual blocks, group
    /// normalisation and a skip connection.
    Unet {
        /// Image channels.
        channels_in: usize,
        /// Image height (even).
        height: usize,
        /// Image width (even).
        width: usize,
        /// Base number of feature channels (a multiple of 8; doubled at half resolution).
        channels: usize,
        /// Width of the sinusoidal noise embedding (even).
        embedding: usize,
    },
}

impl Architecture {
    /// Checks the architecture against the data dimension `dim`, naming the offending field.
    pub fn validate(&self, dim: usize) -> crate::Result<()> {
        let bad = |field: &str, reason: String| Err(crate::Error::invalid(field, reason));
        let embedding = match *self {
            Architecture::Mlp {
                hidden,
                blocks,
                embedding,
            } => {
                if hidden == 0 {
                    return bad("architecture.hidden", "must be positive".into());
                }
                if blocks == 0 {
                    return bad("architecture.blocks", "must be positive".into());
                }
                embedding
            }
            Architecture::Unet {
                channels_in,
                height,
                width,
                channels,
                embedding,
            } => {
                if channels_in * height * width != dim {
                    return bad(
                        "architecture",
                        format!(
                            "channels_in × height × width = {} but the data have dimension {dim}",
                            channels_in * height * width
                        ),
                    );
                }
                if !height.is_multiple_of(2)
                    || !width.is_multiple_of(2)
                    || height == 0
                    || width == 0
                {
                    return bad(
                        "architecture.height",
                        format!("height and width must be even and positive, got {height}×{width}"),
                    );
                }
                if channels == 0 || !channels.is_multiple_of(8) {
                    return bad(
                        "architecture.channels",
                        format!("must be a positive multiple of 8, got {channels}"),
                    );
                }
                embedding
            }
        };
        if embedding < 2 || !embedding.is_multiple_of(2) {
            return bad(
                "architecture.embedding",
                format!("must be even and ≥ 2, got {embedding}"),
            );
        }
        Ok(())
    }

    /// The default residual MLP for dimension `dim`.
    pub fn default_mlp(dim: usize) -> Self {
        Architecture::Mlp {
            hidden: (64 * dim).clamp(128, 512),
            blocks: 3,
            embedding: 32,
        }
    }
}

/// `c ↦ [sin(ω_k c), cos(ω_k c)]` with `ω_k` geometric from 1 to 100: `n` → `n × width`.
fn sinusoidal(c: &Tensor, width: usize) -> Result<Tensor> {
    let half = width / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|k| {
            let u = if half > 1 {
                k as f64 / (half - 1) as f64
            } else {
                0.0
            };
            100f64.powf(u) as f32
        })
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), c.device())?;
    let arg = c.unsqueeze(1)?.broadcast_mul(&freqs)?;
    Tensor::cat(&[arg.sin()?, arg.cos()?], 1)
}

/// The noise-embedding MLP shared by both architectures.
#[derive(Debug)]
struct NoiseEmbedding {
    width: usize,
    first: Linear,
    second: Linear,
}

impl NoiseEmbedding {
    fn new(width: usize, out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(NoiseEmbedding {
            width,
            first: linear(width, out, vb.pp("time1"))?,
            second: linear(out, out, vb.pp("time2"))?,
        })
    }

    fn forward(&self, c_noise: &Tensor) -> Result<Tensor> {
        let e = sinusoidal(c_noise, self.width)?;
        self.second
            .forward(&self.first.forward(&e)?.silu()?)?
            .silu()
    }
}

#[derive(Debug)]
struct MlpBlock {
    first: Linear,
    time: Linear,
    second: Linear,
}

/// The residual MLP of [`Architecture::Mlp`].
#[derive(Debug)]
pub(super) struct Mlp {
    input: Linear,
    embedding: NoiseEmbedding,
    blocks: Vec<MlpBlock>,
    output: Linear,
}

impl Mlp {
    fn new(
        dim: usize,
        hidden: usize,
        blocks: usize,
        embedding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Mlp {
            input: linear(dim, hidden, vb.pp("input"))?,
            embedding: NoiseEmbedding::new(embedding, hidden, vb.pp("embed"))?,
            blocks: (0..blocks)
                .map(|b| {
                    let vb = vb.pp(format!("block{b}"));
                    Ok(MlpBlock {
                        first: linear(hidden, hidden, vb.pp("lin1"))?,
                        time: linear(hidden, hidden, vb.pp("time"))?,
                        second: linear(hidden, hidden, vb.pp("lin2"))?,
                    })
                })
                .collect::<Result<_>>()?,
            output: linear(hidden, dim, vb.pp("out"))?,
        })
    }

    fn forward(&self, y: &Tensor, c_noise: &Tensor) -> Result<Tensor> {
        let t = self.embedding.forward(c_noise)?;
        let mut h = self.input.forward(y)?;
        for b in &self.blocks {
            let inner = (b.first.forward(&h.silu()?)? + b.time.forward(&t)?)?;
            h = (h + b.second.forward(&inner.silu()?)?)?;
        }
        self.output.forward(&h.silu()?)
    }
}

#[derive(Debug)]
struct ResBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    skip: Option<Conv2d>,
}

impl ResBlock {
    fn new(cin: usize, cout: usize, temb: usize, vb: VarBuilder) -> Result<Self> {
        let same = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(ResBlock {
            norm1: group_norm(groups(cin), cin, 1e-5, vb.pp("norm1"))?,
            conv1: conv2d(cin, cout, 3, same, vb.pp("conv1"))?,
            time: linear(temb, cout, vb.pp("time"))?,
            norm2: group_norm(groups(cout), cout, 1e-5, vb.pp("norm2"))?,
            conv2: conv2d(cout, cout, 3, same, vb.pp("conv2"))?,
            skip: (cin != cout)
                .then(|| conv2d(cin, cout, 1, Default::default(), vb.pp("skip")))
                .transpose()?,
        })
    }

    fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let h = h.broadcast_add(&self.time.forward(t)?.unsqueeze(2)?.unsqueeze(3)?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        let skip = match &self.skip {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        h + skip
    }
}

/// Group count for `channels` channels: 8 groups when they divide, else 1 (layer norm).
fn groups(channels: usize) -> usize {
    if channels.is_multiple_of(8) { 8 } else { 1 }
}

/// The two-resolution U-Net of [`Architecture::Unet`].
#[derive(Debug)]
pub(super) struct Unet {
    shape: (usize, usize, usize),
    embedding: NoiseEmbedding,
    conv_in: Conv2d,
    down_block: ResBlock,
    down: Conv2d,
    mid1: ResBlock,
    mid2: ResBlock,
    up_block: ResBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Unet {
    fn new(
        (cin, height, width): (usize, usize, usize),
        ch: usize,
        embedding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let temb = 4 * ch;
        let same = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Unet {
            shape: (cin, height, width),
            embedding: NoiseEmbedding::new(embedding, temb, vb.pp("embed"))?,
            conv_in: conv2d(cin, ch, 3, same, vb.pp("conv_in"))?,
            down_block: ResBlock::new(ch, ch, temb, vb.pp("down_block"))?,
            down: conv2d(
                ch,
                2 * ch,
                3,
                Conv2dConfig {
                    padding: 1,
                    stride: 2,
                    ..Default::default()
                },
                vb.pp("down"),
            )?,
            mid1: ResBlock::new(2 * ch, 2 * ch, temb, vb.pp("mid1"))?,
            mid2: ResBlock::new(2 * ch, 2 * ch, temb, vb.pp("mid2"))?,
            up_block: ResBlock::new(3 * ch, ch, temb, vb.pp("up_block"))?,
            norm_out: group_norm(groups(ch), ch, 1e-5, vb.pp("norm_out"))?,
            conv_out: conv2d(ch, cin, 3, same, vb.pp("out"))?,
        })
    }

    fn forward(&self, y: &Tensor, c_noise: &Tensor) -> Result<Tensor> {
        let n = y.dim(0)?;
        let (c, h, w) = self.shape;
        let t = self.embedding.forward(c_noise)?;
        let x = y.reshape((n, c, h, w))?;
        let e1 = self.down_block.forward(&self.conv_in.forward(&x)?, &t)?;
        let m = self.mid1.forward(&self.down.forward(&e1)?, &t)?;
        let m = self.mid2.forward(&m, &t)?;
        let u = Tensor::cat(&[m.upsample_nearest2d(h, w)?, e1], 1)?;
        let u = self.up_block.forward(&u, &t)?;
        let out = self.conv_out.forward(&self.norm_out.forward(&u)?.silu()?)?;
        out.reshape((n, c * h * w))
    }
}

/// A built network of either architecture.
#[derive(Debug)]
pub(super) enum Net {
    Mlp(Mlp),
    Unet(Box<Unet>),
}

impl Net {
    /// Builds `architecture` for dimension `dim`, taking every parameter from `vb`.
    pub(super) fn new(architecture: &Architecture, dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(match *architecture {
            Architecture::Mlp {
                hidden,
                blocks,
                embedding,
            } => Net::Mlp(Mlp::new(dim, hidden, blocks, embedding, vb)?),
            Architecture::Unet {
                channels_in,
                height,
                width,
                channels,
                embedding,
            } => Net::Unet(Box::new(Unet::new(
                (channels_in, height, width),
                channels,
                embedding,
                vb,
            )?)),
        })
    }

    /// The raw output `F(c_in y, c_noise)`: `n × d` from `n × d` and `n`.
    pub(super) fn forward(&self, y: &Tensor, c_noise: &Tensor) -> Result<Tensor> {
        match self {
            Net::Mlp(m) => m.forward(y, c_noise),
            Net::Unet(u) => u.forward(y, c_noise),
        }
    }
}

/// The computation device: CUDA device 0 when built with the `cuda` feature and one is
/// present, else the CPU.
pub fn device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return d;
    }
    Device::Cpu
}

/// The dtype networks train and run in.
pub const DTYPE: DType = DType::F32;

/// Reduces the last dimension: `n × d` → `n`.
pub(super) fn row_sum(t: &Tensor) -> Result<Tensor> {
    t.sum(D::Minus1)
}
