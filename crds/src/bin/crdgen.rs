//! Prints the PortSlice CRD as YAML. `make crds` writes it to crds/portslice.io_portslices.yaml
//! and the chart; a test fails when the checked-in copy is stale.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    print!("{}", portslice_crds::crd_yaml()?);
    Ok(())
}
