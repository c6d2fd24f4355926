//! Build script. The WGSL shaders (shaders/) and CUDA kernels (kernels/) are embedded with
//! `include_str!` and compiled at run time — by wgpu/naga for the adapter, and by NVRTC for the
//! GPU's exact architecture — so that one binary built without CUDA or Vulkan installed runs on
//! any machine. Nothing is compiled here; the kernel folders are declared as build inputs so
//! that editing a kernel always rebuilds the crate.
fn main() {
    println!("cargo:rerun-if-changed=shaders");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=build.rs");
}
