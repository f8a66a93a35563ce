//! Generates prost messages and tonic clients and servers from `mcim/<area>/v1/*.proto`.
//! Needs `protoc` and the well-known types (Debian: protobuf-compiler, libprotobuf-dev),
//! or `PROTOC` pointing at a protoc.

const PROTOS: &[&str] = &[
    "mcim/common/v1/common.proto",
    "mcim/tre/v1/tre.proto",
    "mcim/supplier/v1/supplier.proto",
    "mcim/ro/v1/ro.proto",
    "mcim/vno/v1/vno.proto",
    "mcim/sho/v1/sho.proto",
    "mcim/pva/v1/pva.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .file_descriptor_set_path(out.join("mcim_descriptor.bin"))
        .compile_protos(PROTOS, &["."])?;
    Ok(())
}
