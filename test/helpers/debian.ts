/**
 * Debian tools the tests need (etcd-server, ...): found on PATH, else installed with apt when
 * running as root, else a failure that says what to install. Never a silent pass.
 */
import { execFile } from 'node:child_process';
import { access, constants } from 'node:fs/promises';
import { promisify } from 'node:util';

const run = promisify(execFile);

async function onPath(binary: string): Promise<string | undefined> {
  for (const dir of (process.env['PATH'] ?? '').split(':')) {
    const p = `${dir}/${binary}`;
    try {
      await access(p, constants.X_OK);
      return p;
    } catch {
      // not here
    }
  }
  return undefined;
}

let aptUpdated = false;

/**
 * Returns the path of `binary`, installing Debian `pkg` when it is missing.
 * @throws Error naming the package when it cannot be installed here.
 */
export async function ensureDebianBinary(binary: string, pkg: string): Promise<string> {
  const found = await onPath(binary);
  if (found) return found;
  if (process.getuid?.() !== 0) {
    throw new Error(`${binary} is missing: install the Debian package ${pkg} (apt-get install ${pkg}) or run the tests as root`);
  }
  try {
    if (!aptUpdated) {
      await run('apt-get', ['update', '-qq'], { timeout: 300_000 });
      aptUpdated = true;
    }
    await run('apt-get', ['install', '-y', '-qq', pkg], {
      timeout: 600_000,
      env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' },
    });
  } catch (err) {
    throw new Error(`${binary} is missing and apt-get install ${pkg} failed: ${(err as Error).message}`, { cause: err });
  }
  const installed = await onPath(binary);
  if (!installed) throw new Error(`apt-get installed ${pkg} but ${binary} is not on PATH`);
  return installed;
}
