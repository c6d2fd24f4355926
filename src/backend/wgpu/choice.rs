//! The kernel path and tile shape the environment asks for (`FUSION_WGPU_KERNEL`,
//! `FUSION_WGPU_TILE`), read in one place for the runner and the `devices` line.

use super::kernels::{KernelChoice, Tile};

/// Environment variable forcing a tile shape (`small`, `large`, `64x64x16`, `128x128x8`).
pub(super) const TILE_ENV: &str = "FUSION_WGPU_TILE";
/// Environment variable choosing the kernel path (`auto`, `f32`, `f16`, `coop`).
pub(super) const KERNEL_ENV: &str = "FUSION_WGPU_KERNEL";

/// The tile and kernel choices of the environment.
pub(super) fn env_choices() -> std::result::Result<(Option<Tile>, KernelChoice), String> {
    let tile = Tile::parse(&std::env::var(TILE_ENV).unwrap_or_default())?;
    let kernel = KernelChoice::parse(&std::env::var(KERNEL_ENV).unwrap_or_default())?;
    Ok((tile, kernel))
}
