//! `livepatch demo`: the whole story on one screen (filled below).
pub fn run(_keep: bool) -> anyhow::Result<()> {
    anyhow::bail!("demo not built yet")
}
