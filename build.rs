// The shared library's soname carries the ABI major version: libvfiokit.so.0.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libvfiokit.so.0");
    // Without this, any file change in the package reruns the script and rebuilds the crate.
    println!("cargo:rerun-if-changed=build.rs");
}
