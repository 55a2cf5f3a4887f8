/**
 * A base image for build tests: one layer with Debian's static busybox (package busybox-static)
 * at /bin/busybox and a symlink for each of its applets where `busybox --list-full` puts it
 * (/bin/sh, /bin/cp, /bin/mkdir, /sbin/depmod, ...), plus any files a test adds (a module object
 * under /src, say), pushed to a test registry for the host's architecture.
 */
import { execFile } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { promisify } from 'node:util';
import type { Platform } from '../../src/registry/types.ts';
import { ensureDebianBinary } from './debian.ts';
import { pushImage, type LayerEntry, type MediaTypes, type PushedImage } from './images.ts';
import type { TestRegistry } from './registry.ts';

const run = promisify(execFile);

/** The platform of images built here (buildah builds for the host). */
export function hostPlatform(): Platform {
  const architecture = ({ x64: 'amd64', ia32: '386', arm: 'arm', ppc64: 'ppc64le' } as Record<string, string>)[process.arch] ?? process.arch;
  return { os: 'linux', architecture };
}

/** Whether an ELF executable has no program interpreter (PT_INTERP), i.e. is statically linked. */
export function isStaticElf(data: Buffer): boolean {
  if (data.length < 64 || data.readUInt32BE(0) !== 0x7f454c46) return false;
  const is64 = data[4] === 2;
  const le = data[5] === 1;
  const u16 = (o: number) => (le ? data.readUInt16LE(o) : data.readUInt16BE(o));
  const u32 = (o: number) => (le ? data.readUInt32LE(o) : data.readUInt32BE(o));
  const phoff = is64 ? Number(le ? data.readBigUInt64LE(0x20) : data.readBigUInt64BE(0x20)) : u32(0x1c);
  const phentsize = u16(is64 ? 0x36 : 0x2a);
  const phnum = u16(is64 ? 0x38 : 0x2c);
  for (let i = 0; i < phnum; i++) {
    const off = phoff + i * phentsize;
    if (off + 4 > data.length) return false;
    if (u32(off) === 3) return false; // PT_INTERP
  }
  return true;
}

let busybox: Promise<{ binary: Buffer; applets: string[] }> | undefined;

/** Debian's static busybox and its applets' paths (`usr/bin/[`, `sbin/depmod`, ...). */
export function staticBusybox(): Promise<{ binary: Buffer; applets: string[] }> {
  busybox ??= (async () => {
    const path = await ensureDebianBinary('busybox', 'busybox-static');
    const binary = await readFile(path);
    if (!isStaticElf(binary)) {
      throw new Error(`${path} is not statically linked: install the Debian package busybox-static (apt-get install busybox-static) instead of busybox`);
    }
    const { stdout } = await run(path, ['--list-full'], { timeout: 10_000 });
    const applets = stdout
      .split('\n')
      .map((l) => l.trim().replace(/^\/+/, ''))
      .filter((l) => l !== '' && l !== 'bin/busybox');
    return { binary, applets };
  })();
  return busybox;
}

export interface BusyboxImageOptions {
  /** Added after busybox and its links (a module under /src, say). */
  readonly files?: readonly LayerEntry[];
  /** Default 'oci'. */
  readonly mediaTypes?: MediaTypes;
}

/** Pushes the busybox base image as `repoTag` (e.g. `base/busybox:1`) to `registry`. */
export async function pushBusyboxImage(registry: TestRegistry, repoTag: string, options: BusyboxImageOptions = {}): Promise<PushedImage> {
  const { binary, applets } = await staticBusybox();
  const dirs = new Set<string>(['bin/', 'sbin/', 'usr/', 'usr/bin/', 'usr/sbin/', 'etc/', 'root/']);
  for (const a of applets) {
    const parts = a.split('/').slice(0, -1);
    for (let i = 1; i <= parts.length; i++) dirs.add(`${parts.slice(0, i).join('/')}/`);
  }
  const entries: LayerEntry[] = [
    ...[...dirs].sort().map((path): LayerEntry => ({ path, type: 'directory' })),
    { path: 'tmp/', type: 'directory', mode: 0o1777 },
    { path: 'bin/busybox', content: binary, mode: 0o755 },
    ...applets.map((path): LayerEntry => ({ path, linkTo: '/bin/busybox' })),
    ...(options.files ?? []),
  ];
  return pushImage(registry, repoTag, {
    layers: [{ entries }],
    platform: hostPlatform(),
    mediaTypes: options.mediaTypes ?? 'oci',
    config: { Env: ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'], Cmd: ['/bin/sh'] },
  });
}
