//! NFS-Ganesha 4.3 (Debian's `nfs-ganesha` + `nfs-ganesha-vfs`) as the peer server:
//! NFSv3 over TCP only, VFS back end, exporting one directory on one address.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use localnfs_testbed::Process;
use localnfs_testbed::kernel::KernelNode;

/// NFS-Ganesha (VFS back end) exporting `export` on `addr`, with the rpcbind it needs
/// (started here unless one runs). Stopped by PID on drop.
pub struct Ganesha {
    _processes: Vec<Process>,
    pub nfs_port: u16,
    pub mount_port: u16,
}

impl Ganesha {
    pub async fn start(dir: &Path, export: &Path, addr: IpAddr) -> Ganesha {
        let mut processes = Vec::new();
        let rpcbind_up = || {
            Command::new("rpcinfo")
                .args(["-p", "127.0.0.1"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !rpcbind_up() {
            processes.push(
                Process::spawn(
                    "rpcbind",
                    Command::new("rpcbind").arg("-f"),
                    &dir.join("rpcbind.log"),
                )
                .expect("start rpcbind (apt-get install rpcbind)"),
            );
            super::eventually("rpcbind", Duration::from_secs(20), || async {
                rpcbind_up().then_some(())
            })
            .await;
        }
        let (nfs_port, mount_port) = (
            localnfs_testbed::free_port().expect("port"),
            localnfs_testbed::free_port().expect("port"),
        );
        std::fs::create_dir_all(dir.join("recovery")).expect("recovery dir");
        // Debian installs the FSALs under the architecture's multiarch directory.
        let plugins = std::fs::read_dir("/usr/lib")
            .expect("/usr/lib")
            .flatten()
            .map(|d| d.path().join("ganesha"))
            .find(|d| d.join("libfsalvfs.so").is_file())
            .expect("libfsalvfs.so (apt-get install nfs-ganesha-vfs)");
        let plugins = plugins.display();
        let conf = format!(
            "NFS_CORE_PARAM {{ Protocols = 3; Bind_addr = {addr}; NFS_Port = {nfs_port};
                MNT_Port = {mount_port}; Enable_NLM = false; Enable_RQUOTA = false;
                Enable_UDP = false; Plugins_Dir = \"{plugins}\"; }}
             NFSV4 {{ RecoveryRoot = \"{rec}\"; Graceless = true; }}
             EXPORT {{ Export_Id = 1; Path = \"{e}\"; Pseudo = \"{e}\"; Protocols = 3;
                Transports = TCP; Access_Type = RW; Squash = No_Root_Squash; SecType = sys;
                FSAL {{ Name = VFS; }} }}
             LOG {{ Default_Log_Level = EVENT; }}",
            rec = dir.join("recovery").display(),
            e = export.display(),
        );
        let conf_path = dir.join("ganesha.conf");
        std::fs::write(&conf_path, conf).expect("ganesha.conf");
        processes.push(
            Process::spawn(
                "ganesha.nfsd",
                Command::new("ganesha.nfsd")
                    .args(["-F", "-N", "NIV_EVENT", "-f"])
                    .arg(&conf_path)
                    .arg("-L")
                    .arg(dir.join("ganesha.log"))
                    .arg("-p")
                    .arg(dir.join("ganesha.pid")),
                &dir.join("ganesha.out"),
            )
            .expect("start ganesha.nfsd (apt-get install nfs-ganesha nfs-ganesha-vfs)"),
        );
        super::eventually(
            "ganesha.nfsd listening",
            Duration::from_secs(60),
            || async {
                let nfs = tokio::net::TcpStream::connect(SocketAddr::new(addr, nfs_port)).await;
                let mnt = tokio::net::TcpStream::connect(SocketAddr::new(addr, mount_port)).await;
                (nfs.is_ok() && mnt.is_ok()).then_some(())
            },
        )
        .await;
        Ganesha {
            _processes: processes,
            nfs_port,
            mount_port,
        }
    }

    /// Mounts the export at `target` in `node` with the options localnfs PVs use.
    pub async fn mount(&self, node: &KernelNode, addr: IpAddr, export: &Path, target: &str) {
        let options = [
            "nfsvers=3".to_owned(),
            "proto=tcp".to_owned(),
            format!("port={}", self.nfs_port),
            format!("mountport={}", self.mount_port),
            "nolock".to_owned(),
            "hard".to_owned(),
        ];
        node.mount_nfs(
            &addr.to_string(),
            &export.to_string_lossy(),
            &options,
            target,
        )
        .await
        .expect("mount Ganesha's export");
    }
}
