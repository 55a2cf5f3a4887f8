/**
 * `kmm-preflight check`: validates Module manifests against a kernel or an OpenShift release
 * without a cluster. Exit codes: 0 every Module verified, 1 any not verified, 2 bad usage or input.
 */
import { readFile } from 'node:fs/promises';

import { parseArgs } from 'node:util';
import { parseImageReference } from '../image/reference.ts';
import { createRegistryClient } from '../registry/client.ts';
import { parseDockerConfigJson } from '../registry/docker-config.ts';
import type { DockerConfig, Platform } from '../registry/types.ts';
import { createImageStage } from '../engine/image-stage.ts';
import { createDiskLayerCache, createMemoryLayerCache } from '../engine/layer-cache.ts';
import { registryFileReader } from '../engine/image-files.ts';
import type { KmmModule } from '../engine/module.ts';
import { resolveReleaseKernel } from '../engine/ocp-release.ts';
import { validateModuleForKernel, type BuildSignDeps, type ModuleVerdict, type ValidationDeps } from '../engine/validate.ts';
import { InputError, loadManifests } from './manifests.ts';
import { createLocalBuilder } from '../build/local-builder.ts';
import { createSignStage } from '../engine/sign-stage.ts';
import type { SignHashAlgorithm } from '../sign/module-signature.ts';

export const CHECK_USAGE = `Usage: kmm-preflight check (--kernel VERSION | --release-image REF [--rt]) -f PATH [-f PATH ...] [options]

Validates every KMM Module in the given manifests (files or directories of YAML/JSON) against a
kernel, or against the kernel of an OpenShift release image, without a cluster.

Options:
  --kernel VERSION        target kernel, as uname -r prints it (e.g. 6.1.0-18-amd64)
  --release-image REF     OpenShift release image; the kernel comes from its driver-toolkit
  --rt                    with --release-image: the real-time kernel
  -f, --filename PATH     Module manifests (repeatable); Secrets of type dockerconfigjson in them
                          serve the Modules' imageRepoSecret
  --pull-secret FILE      .dockerconfigjson (or a Secret manifest) used when a Module names none
  --arch ARCH             target architecture (default: amd64; never guessed from this machine)
  --os OS                 target OS (default: linux)
  --registry-ca FILE      extra CA certificates (PEM) trusted for every registry
  --insecure-registry HOST  read the release and driver-toolkit images from HOST[:PORT] over
                          plain HTTP (repeatable; Modules say this in their registryTLS)
  --cache-dir DIR         keep layer scans on disk, so a second check downloads nothing again
  --concurrency N         Modules validated at once (default: 8)
  --push-built-image      push what the Build and Sign stages produce to the Modules'
                          containerImage (as a PreflightValidation's pushBuiltImage)
  --builder KIND          local (default: Debian's buildah on this machine, as root) or none
  --build-timeout SECONDS a build not finished after this long fails (default: 1800)
  --sign-hash-algorithm A sha256 (default), sha384 or sha512
  -o, --output FORMAT     table (default) or json
  -h, --help              this help

Exit codes: 0 every Module verified, 1 any Module not verified, 2 bad usage or input.`;

export interface CheckIo {
  readonly stdout: NodeJS.WritableStream & { isTTY?: boolean };
  readonly stderr: NodeJS.WritableStream & { isTTY?: boolean };
}

class UsageError extends Error {}

const ARCHES: Record<string, string> = { x64: 'amd64', arm64: 'arm64', ppc64: 'ppc64le', s390x: 's390x' };

function parse(argv: readonly string[]) {
  let parsed;
  try {
    parsed = parseArgs({
      args: [...argv],
      options: {
        kernel: { type: 'string' },
        'release-image': { type: 'string' },
        rt: { type: 'boolean', default: false },
        filename: { type: 'string', short: 'f', multiple: true },
        'pull-secret': { type: 'string' },
        arch: { type: 'string', default: 'amd64' },
        os: { type: 'string', default: 'linux' },
        'registry-ca': { type: 'string' },
        'insecure-registry': { type: 'string', multiple: true },
        'cache-dir': { type: 'string' },
        concurrency: { type: 'string', default: '8' },
        'push-built-image': { type: 'boolean', default: false },
        builder: { type: 'string', default: 'local' },
        'build-timeout': { type: 'string', default: '1800' },
        'sign-hash-algorithm': { type: 'string', default: 'sha256' },
        output: { type: 'string', short: 'o', default: 'table' },
        help: { type: 'boolean', short: 'h', default: false },
      },
      strict: true,
      allowPositionals: false,
    });
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  const v = parsed.values;
  if (v.help) return { help: true as const };
  if (!v.kernel === !v['release-image']) throw new UsageError('give exactly one of --kernel and --release-image');
  if (v.rt && !v['release-image']) throw new UsageError('--rt goes with --release-image');
  if (!v.filename || v.filename.length === 0) throw new UsageError('give the Module manifests with -f PATH');
  if (v.output !== 'table' && v.output !== 'json') throw new UsageError(`--output must be table or json, not "${v.output}"`);
  const concurrency = Number(v.concurrency);
  if (!Number.isInteger(concurrency) || concurrency < 1 || concurrency > 256) throw new UsageError('--concurrency must be a whole number from 1 to 256');
  if (v.builder !== 'local' && v.builder !== 'none') throw new UsageError(`--builder must be local or none, not "${v.builder}"`);
  const buildTimeout = Number(v['build-timeout']);
  if (!Number.isFinite(buildTimeout) || buildTimeout <= 0) throw new UsageError('--build-timeout must be a positive number of seconds');
  const hash = v['sign-hash-algorithm'];
  if (hash !== 'sha256' && hash !== 'sha384' && hash !== 'sha512') throw new UsageError(`--sign-hash-algorithm must be sha256, sha384 or sha512, not "${hash}"`);
  if (v.kernel !== undefined && !/^[^.,\-\s]+([.,\-][^.,\-\s]+){2,}$/.test(v.kernel)) {
    throw new UsageError(`--kernel "${v.kernel}" is not a kernel version: it must split on ".", "," or "-" into at least 3 fields (e.g. 6.1.0-18-amd64)`);
  }
  if (v['release-image'] !== undefined) {
    try {
      parseImageReference(v['release-image']);
    } catch (err) {
      throw new UsageError(`--release-image: ${(err as Error).message}`);
    }
  }
  return {
    help: false as const,
    kernel: v.kernel,
    releaseImage: v['release-image'],
    rt: v.rt ?? false,
    files: v.filename,
    pullSecret: v['pull-secret'],
    platform: { os: v.os ?? 'linux', architecture: ARCHES[v.arch ?? ''] ?? v.arch ?? 'amd64' } as Platform,
    registryCa: v['registry-ca'],
    insecureRegistries: new Set(v['insecure-registry'] ?? []),
    cacheDir: v['cache-dir'],
    concurrency,
    output: v.output as 'table' | 'json',
    push: v['push-built-image'] ?? false,
    builder: v.builder as 'local' | 'none',
    buildTimeoutMs: buildTimeout * 1000,
    signHashAlgorithm: hash as SignHashAlgorithm,
  };
}

async function readDockerConfig(file: string): Promise<DockerConfig> {
  const text = await readFile(file, 'utf8').catch(() => {
    throw new InputError(`--pull-secret ${file}: cannot read the file`);
  });
  try {
    const doc = JSON.parse(text) as { kind?: string; data?: Record<string, string> };
    if (doc.kind === 'Secret' && doc.data?.['.dockerconfigjson']) {
      return parseDockerConfigJson(Buffer.from(doc.data['.dockerconfigjson'], 'base64').toString('utf8'));
    }
  } catch {
    // not JSON: maybe a YAML Secret below
  }
  try {
    const { default: YAML } = await import('yaml');
    const doc = YAML.parse(text) as { kind?: string; data?: Record<string, string>; stringData?: Record<string, string> };
    if (doc?.kind === 'Secret') {
      const plain = doc.stringData?.['.dockerconfigjson'] ?? Buffer.from(doc.data?.['.dockerconfigjson'] ?? '', 'base64').toString('utf8');
      return parseDockerConfigJson(plain);
    }
    return parseDockerConfigJson(text);
  } catch (err) {
    throw new InputError(`--pull-secret ${file}: not a .dockerconfigjson or a Secret holding one (${(err as Error).message})`);
  }
}

/** Runs `tasks` with at most `limit` at once, calling `done` as each finishes. */
async function pool<T, R>(items: readonly T[], limit: number, work: (item: T) => Promise<R>, done: (r: R) => void): Promise<R[]> {
  const results: R[] = new Array(items.length);
  let next = 0;
  const worker = async () => {
    for (;;) {
      const i = next++;
      if (i >= items.length) return;
      results[i] = await work(items[i]!);
      done(results[i]!);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return results;
}

function table(rows: readonly ModuleVerdict[]): string {
  const header = ['NAMESPACE', 'NAME', 'STATUS', 'STAGE', 'REASON'];
  const data = rows.map((r) => [r.namespace, r.name, r.status, r.stage, r.reason]);
  const widths = header.map((h, i) => Math.max(h.length, ...data.map((d) => d[i]!.length)));
  const line = (cells: readonly string[]) =>
    cells.map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]! + 3))).join('').trimEnd();
  return [line(header), ...data.map(line)].join('\n') + '\n';
}

export async function runCheck(argv: readonly string[], io: CheckIo): Promise<number> {
  let args;
  try {
    args = parse(argv);
  } catch (err) {
    if (err instanceof UsageError) {
      io.stderr.write(`kmm-preflight check: ${err.message}; see --help.\n`);
      return 2;
    }
    throw err;
  }
  if (args.help) {
    io.stdout.write(`${CHECK_USAGE}\n`);
    return 0;
  }
  let manifests;
  let globalCredentials: DockerConfig | undefined;
  let caCertificates: string[] | undefined;
  try {
    manifests = await loadManifests(args.files);
    if (args.pullSecret) globalCredentials = await readDockerConfig(args.pullSecret);
    if (args.registryCa) {
      caCertificates = [await readFile(args.registryCa, 'utf8').catch(() => {
        throw new InputError(`--registry-ca ${args.registryCa}: cannot read the file`);
      })];
    }
  } catch (err) {
    if (err instanceof InputError) {
      io.stderr.write(`kmm-preflight check: ${err.message}\n`);
      return 2;
    }
    throw err;
  }
  if (manifests.modules.length === 0) {
    io.stderr.write('kmm-preflight check: no KMM Module (kmm.sigs.x-k8s.io/v1beta1) in the given manifests\n');
    return 2;
  }

  const registry = createRegistryClient({ userAgent: 'kmm-preflight-check' });
  const cache = args.cacheDir ? createDiskLayerCache({ dir: args.cacheDir }) : createMemoryLayerCache();
  const imageStage = createImageStage({ registry, cache });
  const builder = args.builder === 'local' ? createLocalBuilder({ timeoutMs: args.buildTimeoutMs }) : undefined;
  const signStage = createSignStage({ registry });
  const updates = new Map<string, () => void>();
  builder?.onUpdate((key) => updates.get(key)?.());
  /** Validates a Module, waiting for its build when one runs; cleans up after it. */
  const validateUntilDecided = async (m: KmmModule, k: string, deps: ValidationDeps): Promise<ModuleVerdict> => {
    const ns = m.metadata.namespace ?? 'default';
    const key = `check|${ns}/${m.metadata.name}`;
    const buildSign: BuildSignDeps = {
      key,
      owner: { apiVersion: 'v1', kind: 'check', name: 'kmm-preflight-check', uid: '' },
      push: args.push,
      ...(builder ? { builder } : { noBuilderReason: 'builds are turned off (--builder none)' }),
      signStage,
      signHashAlgorithm: args.signHashAlgorithm,
      configMapData: (namespace, name) => manifests.configMaps.get(`${namespace}/${name}`),
      secretData: (namespace, name) => manifests.secrets.get(`${namespace}/${name}`),
      pullSecretText: (mod) => (mod.spec.imageRepoSecret ? manifests.pullSecrets.get(`${ns}/${mod.spec.imageRepoSecret.name}`) : undefined),
    };
    for (;;) {
      const changed = new Promise<void>((r) => {
        updates.set(key, r);
        setTimeout(r, 5000).unref();
      });
      const v = await validateModuleForKernel(m, k, { ...deps, buildSign });
      if (v.status !== 'Unknown') {
        updates.delete(key);
        await v.release?.();
        return v;
      }
      await changed;
    }
  };

  let kernel = args.kernel;
  if (!kernel) {
    const resolution = await resolveReleaseKernel(
      args.releaseImage!,
      args.rt,
      registryFileReader(
        registry,
        (host) => ({
          ...(globalCredentials ? { credentials: globalCredentials } : {}),
          ...(caCertificates ? { caCertificates } : {}),
          insecure: args.insecureRegistries.has(host),
        }),
        args.platform,
      ),
    );
    if (!resolution.ok) {
      io.stderr.write(`kmm-preflight check: ${resolution.reason}\n`);
      return 1;
    }
    kernel = resolution.kernel;
    if (args.output === 'table') io.stderr.write(`release ${args.releaseImage} has kernel ${kernel} (driver-toolkit ${resolution.driverToolkitImage})\n`);
  }

  const secretCache = new Map<string, DockerConfig>();
  const credentialsFor = async (m: KmmModule): Promise<DockerConfig | undefined> => {
    const secret = m.spec.imageRepoSecret?.name;
    if (!secret) return globalCredentials;
    const key = `${m.metadata.namespace ?? 'default'}/${secret}`;
    const text = manifests.pullSecrets.get(key);
    if (text === undefined) {
      if (globalCredentials) return globalCredentials;
      throw new Error(`imageRepoSecret ${key} is not among the given manifests; add it with -f or give --pull-secret`);
    }
    let parsed = secretCache.get(key);
    if (!parsed) secretCache.set(key, (parsed = parseDockerConfigJson(text)));
    return parsed;
  };

  const progress = io.stderr.isTTY === true;
  const counts = { True: 0, False: 0, Error: 0, Unknown: 0 };
  const total = manifests.modules.length;
  const show = () => {
    const doneCount = counts.True + counts.False + counts.Error;
    io.stderr.write(`\r[${doneCount}/${total}] verified ${counts.True}, failed ${counts.False}, errors ${counts.Error}\x1b[K`);
  };
  if (progress) show();
  let verdicts: ModuleVerdict[];
  try {
    verdicts = await pool(
      manifests.modules,
      args.concurrency,
      (m) => validateUntilDecided(m, kernel!, { imageStage, platform: args.platform, credentialsFor, ...(caCertificates ? { caCertificates } : {}) }),
      (v) => {
        counts[v.status]++;
        if (progress) show();
      },
    );
  } finally {
    await builder?.close();
    await registry.close();
  }
  if (progress) io.stderr.write('\r\x1b[K');

  if (args.output === 'json') {
    io.stdout.write(
      `${JSON.stringify(
        {
          kernel,
          ...(args.releaseImage ? { releaseImage: args.releaseImage, rt: args.rt } : {}),
          platform: args.platform,
          summary: { total, verified: counts.True, failed: counts.False, error: counts.Error },
          modules: verdicts.map((v) => ({
            namespace: v.namespace,
            name: v.name,
            verificationStatus: v.status,
            stage: v.stage,
            code: v.code,
            statusReason: v.reason,
            ...(v.image ? { image: v.image } : {}),
          })),
        },
        null,
        2,
      )}\n`,
    );
  } else {
    io.stdout.write(table(verdicts));
    io.stdout.write(`\n${counts.True}/${total} verified for kernel ${kernel}${counts.False ? `, ${counts.False} failed` : ''}${counts.Error ? `, ${counts.Error} could not be checked` : ''}\n`);
  }
  return counts.True === total ? 0 : 1;
}

