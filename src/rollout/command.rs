pub fn run(_args: &crate::cli::GenerateArgs) -> anyhow::Result<()> {
    anyhow::bail!("generate: not wired yet")
}
