/**
 * buildah for the local builder's tests: Debian's, installed when missing (as root), and a
 * recording wrapper that notes every invocation (its pid, which is also the process group of a
 * build, and its arguments) before it execs the real binary.
 */
import { chmod, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ensureDebianBinary } from './debian.ts';

export interface BuildahCall {
  readonly pid: number;
  /** The subcommand after the global flags: `build`, `push`, `rmi`, `--version`, ... */
  readonly command: string;
  readonly args: readonly string[];
}

export interface RecordingBuildah {
  /** Give this to the builder as its `buildah`. */
  readonly path: string;
  calls(): Promise<BuildahCall[]>;
  /** Calls of one subcommand. */
  callsOf(command: string): Promise<BuildahCall[]>;
}

/** The path of Debian's buildah; installs package `buildah` when missing (root only). */
export function requireBuildah(): Promise<string> {
  return ensureDebianBinary('buildah', 'buildah');
}

/** Flags that buildah takes before its subcommand, with their values. */
const GLOBAL_WITH_VALUE = new Set(['--root', '--runroot', '--storage-driver', '--storage-opt', '--log-level', '--registries-conf', '--userns-uid-map', '--userns-gid-map']);

function commandOf(args: readonly string[]): string {
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (GLOBAL_WITH_VALUE.has(a)) i++;
    else if (!a.startsWith('--') || a === '--version') return a;
  }
  return '';
}

/** Writes `<dir>/buildah`, which logs its calls to `<dir>/calls.log` and execs the real buildah. */
export async function recordingBuildah(dir: string): Promise<RecordingBuildah> {
  const real = await requireBuildah();
  const path = join(dir, 'buildah');
  const logPath = join(dir, 'calls.log');
  await writeFile(logPath, '');
  // One write per call (O_APPEND), so parallel calls do not interleave; fields split by \x1f.
  const script = [
    '#!/bin/sh',
    'sep=$(printf "\\037")',
    'line="$$"',
    'for a in "$@"; do line="$line$sep$a"; done',
    `printf '%s\\n' "$line" >> '${logPath}'`,
    `exec '${real}' "$@"`,
    '',
  ].join('\n');
  await writeFile(path, script);
  await chmod(path, 0o755);
  const calls = async (): Promise<BuildahCall[]> =>
    (await readFile(logPath, 'utf8'))
      .split('\n')
      .filter((l) => l !== '')
      .map((l) => {
        const [pid, ...args] = l.split('\x1f');
        return { pid: Number(pid), command: commandOf(args), args };
      });
  return { path, calls, callsOf: async (command) => (await calls()).filter((c) => c.command === command) };
}

/** The value after `flag` in a call's arguments. */
export function flagValue(call: BuildahCall, flag: string): string | undefined {
  const i = call.args.indexOf(flag);
  return i >= 0 ? call.args[i + 1] : undefined;
}

/** Whether any process of group `pgid` still exists (zombies included until reaped). */
export function processGroupAlive(pgid: number): boolean {
  try {
    process.kill(-pgid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Waits until group `pgid` is gone; false when it is still there after `timeoutMs`. */
export async function waitGroupGone(pgid: number, timeoutMs = 5_000): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (processGroupAlive(pgid)) {
    if (Date.now() > deadline) return false;
    await new Promise((r) => setTimeout(r, 50));
  }
  return true;
}
