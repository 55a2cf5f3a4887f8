/**
 * A real etcd (Debian's etcd-server) on loopback ports with a temporary data directory, for the
 * etcd storage tests and the test control plane.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ensureDebianBinary } from './debian.ts';
import { freePort } from './server.ts';

export interface TestEtcd {
  /** Client URL, e.g. http://127.0.0.1:23790 */
  readonly url: string;
  readonly dataDir: string;
  output(): string;
  /** Stops etcd (SIGTERM, or SIGKILL with `hard`) but keeps its data, so `start()` can resume. */
  kill(hard?: boolean): Promise<void>;
  /** Starts it again on the same ports and data. */
  start(): Promise<void>;
  /** Stops it and removes the data. */
  stop(): Promise<void>;
}

async function healthy(url: string): Promise<boolean> {
  try {
    const r = await fetch(`${url}/health`, { signal: AbortSignal.timeout(1000) });
    return r.ok && ((await r.json()) as { health?: string }).health === 'true';
  } catch {
    return false;
  }
}

/** Starts etcd; `binary` overrides Debian's etcd-server (e.g. from KUBEBUILDER_ASSETS). */
export async function startEtcd(options: { binary?: string } = {}): Promise<TestEtcd> {
  const etcd = options.binary ?? (await ensureDebianBinary('etcd', 'etcd-server'));
  const dir = await mkdtemp(join(tmpdir(), 'kmm-preflight-etcd-'));
  const [clientPort, peerPort] = [await freePort(), await freePort()];
  const url = `http://127.0.0.1:${clientPort}`;
  let child: ChildProcess | undefined;
  let out = '';
  let exited: Promise<void> = Promise.resolve();

  const start = async () => {
    child = spawn(
      etcd,
      [
        '--name', 'test',
        '--data-dir', join(dir, 'data'),
        '--listen-client-urls', url,
        '--advertise-client-urls', url,
        '--listen-peer-urls', `http://127.0.0.1:${peerPort}`,
        '--initial-advertise-peer-urls', `http://127.0.0.1:${peerPort}`,
        '--initial-cluster', `test=http://127.0.0.1:${peerPort}`,
        '--log-level', 'warn',
        '--logger', 'zap',
      ],
      { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ETCD_UNSUPPORTED_ARCH: process.arch === 'x64' ? '' : process.arch } },
    );
    const c = child;
    c.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    c.stderr!.on('data', (d: Buffer) => (out += d.toString()));
    exited = new Promise((r) => c.once('exit', () => r()));
    const deadline = Date.now() + 20_000;
    while (!(await healthy(url))) {
      if (c.exitCode !== null) throw new Error(`etcd exited with ${c.exitCode}:\n${out}`);
      if (Date.now() > deadline) throw new Error(`etcd did not become healthy in 20 s:\n${out}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  };

  const kill = async (hard = false) => {
    if (child && child.exitCode === null && child.signalCode === null) {
      child.kill(hard ? 'SIGKILL' : 'SIGTERM');
      await exited;
    }
  };

  await start().catch(async (err) => {
    await kill(true);
    await rm(dir, { recursive: true, force: true });
    throw err;
  });

  return {
    url,
    dataDir: join(dir, 'data'),
    output: () => out,
    kill,
    start,
    stop: async () => {
      await kill();
      await rm(dir, { recursive: true, force: true });
    },
  };
}
