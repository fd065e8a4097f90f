//! The vfio-user device model (model.rs) as a program, for the C and Python tests and for
//! trying vfiokit without hardware: `vfio-user-model <socket path>` serves one connection.

#[path = "model.rs"]
mod model;

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: vfio-user-model <socket path>");
        std::process::exit(2);
    };
    if model::serve(std::path::Path::new(&path)).join().is_err() {
        std::process::exit(1);
    }
}
