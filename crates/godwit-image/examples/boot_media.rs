//! Lists how many page extents of a kernel and initramfs the migration
//! codec's disk hook would index: `boot_media KERNEL [INITRD]`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(kernel) = args.first() else {
        eprintln!("usage: boot_media KERNEL [INITRD]");
        std::process::exit(2);
    };
    let work = std::env::temp_dir().join("godwit-boot-media");
    let initrd = args.get(1).map(std::path::Path::new);
    // Say why a part is skipped (the library only logs it).
    if let Err(e) = godwit_image::ramimage::vmlinux(std::path::Path::new(kernel), &work)
        .and_then(|p| godwit_image::ramimage::elf_load_pages(&p))
    {
        eprintln!("kernel segments: {e}");
    }
    match godwit_image::ramimage::boot_media_extents(std::path::Path::new(kernel), initrd, &work) {
        Ok(ext) => {
            for e in ext {
                println!("{:>8} pages  {}", e.chunks.len(), e.path.display());
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
