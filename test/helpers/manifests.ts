/**
 * Manifests and waits the end-to-end tests share: a KMM Module whose kernel mapping points at a
 * test registry, an image holding a module built for a kernel, and polling until a probe answers.
 */
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { buildModuleObject } from './kmod-fixtures.ts';
import { ROOT } from './server.ts';
import { pushImage, type PushedImage } from './images.ts';
import type { TestRegistry } from './registry.ts';

export interface ModuleYamlOptions {
  readonly namespace?: string;
  /** The kernel mapping's match line (default: every kernel). */
  readonly match?: string;
  /** Extra lines of the kernel mapping (indented 10 spaces), e.g. a build or sign section. */
  readonly mapping?: string;
}

/** A Module `name` whose image is `<registry>/drivers/<name>:${KERNEL_FULL_VERSION}` over plain HTTP. */
export function moduleYaml(registry: Pick<TestRegistry, 'host'>, name: string, o: ModuleYamlOptions = {}): string {
  return `apiVersion: kmm.sigs.x-k8s.io/v1beta1
kind: Module
metadata: {name: ${name}, namespace: ${o.namespace ?? 'drivers'}}
spec:
  selector: {kubernetes.io/arch: amd64}
  moduleLoader:
    container:
      modprobe: {moduleName: ${name}}
      kernelMappings:
        - ${o.match ?? "regexp: '^.+$'"}
          containerImage: ${registry.host}/drivers/${name}:\${KERNEL_FULL_VERSION}
          registryTLS: {insecure: true}
${o.mapping ?? ''}`;
}

/** Pushes `drivers/<name>:<kernel>` holding `<name>.ko` built for `kernel`, listed in modules.dep. */
export async function pushModuleImage(registry: TestRegistry, name: string, kernel: string): Promise<PushedImage> {
  const ko = await buildModuleObject({ name, vermagic: `${kernel} SMP preempt mod_unload modversions` });
  return pushImage(registry, `drivers/${name}:${kernel}`, {
    layers: [{ entries: [{ path: `opt/lib/modules/${kernel}/extra/${name}.ko`, content: ko }, { path: `opt/lib/modules/${kernel}/modules.dep`, content: `extra/${name}.ko:\n` }] }],
  });
}

/**
 * Pushes an OpenShift release image `ocp/release:<tag>` whose payload names a driver-toolkit
 * image (`ocp/driver-toolkit:v1`, pushed too) with `kernel` and `rtKernel`; returns the release.
 */
export async function pushReleaseImage(registry: TestRegistry, tag: string, kernel: string, rtKernel: string): Promise<PushedImage> {
  const dtk = await pushImage(registry, 'ocp/driver-toolkit:v1', {
    layers: [{ entries: [{ path: 'etc/driver-toolkit-release.json', content: JSON.stringify({ KERNEL_VERSION: kernel, RT_KERNEL_VERSION: rtKernel }) }] }],
  });
  const refs = { kind: 'ImageStream', apiVersion: 'image.openshift.io/v1', spec: { tags: [{ name: 'driver-toolkit', from: { kind: 'DockerImage', name: dtk.reference } }] } };
  return pushImage(registry, `ocp/release:${tag}`, { layers: [{ entries: [{ path: 'release-manifests/image-references', content: JSON.stringify(refs) }] }] });
}

/** Polls `probe` until it returns something other than undefined; `context` adds to the timeout error. */
export async function until<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 90_000, context: () => string = () => ''): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${context() ? `\n${context()}` : ''}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** Runs `kmm-preflight check ARGS` as a user would, in `cwd`; killed after `timeoutMs`. */
export function runCheckCli(args: readonly string[], cwd: string, timeoutMs = 300_000): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [join(ROOT, 'src', 'cli.ts'), 'check', ...args], { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code: code ?? -1, stdout, stderr });
    });
  });
}
