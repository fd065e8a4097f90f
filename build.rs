// The shared library's soname carries the ABI major version: libvfiokit.so.0.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libvfiokit.so.0");
}
