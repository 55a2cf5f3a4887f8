/**
 * The `check` command end to end: the real CLI process against a real registry holding images
 * built by the tests, with real ELF kernel objects.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { buildModuleObject } from '../helpers/kmod-fixtures.ts';
import { pushImage } from '../helpers/images.ts';
import { runCheckCli, pushReleaseImage } from '../helpers/manifests.ts';
import { dockerConfigFor, startRegistry, type TestRegistry } from '../helpers/registry.ts';

t.setTimeout(240_000);

const KERNEL = '6.1.0-18-amd64';
const RT_KERNEL = '6.1.0-18-rt-amd64';

let open: TestRegistry;
let locked: TestRegistry;
let dir: string;

const run = (args: readonly string[]) => runCheckCli(args, dir, 120_000);

async function moduleImage(registry: TestRegistry, repoTag: string, name: string, kernel: string, vermagicKernel = kernel) {
  const ko = await buildModuleObject({ name, vermagic: `${vermagicKernel} SMP preempt mod_unload modversions` });
  return pushImage(registry, repoTag, {
    layers: [
      { entries: [{ path: 'etc/os-release', content: 'ID=debian\n' }] },
      {
        entries: [
          { path: `opt/lib/modules/${kernel}/extra/${name}.ko`, content: ko },
          { path: `opt/lib/modules/${kernel}/modules.dep`, content: `extra/${name}.ko:\n` },
        ],
      },
    ],
  });
}

const moduleYaml = (name: string, image: string, extra = '', mappingExtra = '') => `apiVersion: kmm.sigs.x-k8s.io/v1beta1
kind: Module
metadata:
  name: ${name}
  namespace: drivers
spec:
${extra}  selector:
    kubernetes.io/arch: amd64
  moduleLoader:
    container:
      modprobe:
        moduleName: ${name}
      kernelMappings:
        - regexp: '^6\\.1\\..*'
          containerImage: ${image}
          registryTLS:
            insecure: true
${mappingExtra}`;

t.before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'kmm-preflight-check-'));
  [open, locked] = await Promise.all([startRegistry(), startRegistry({ auth: 'token' })]);
  await moduleImage(open, 'drivers/gpu:6.1.0-18-amd64', 'gpu', KERNEL);
  await moduleImage(open, 'drivers/old-nic:6.1.0-18-amd64', 'old_nic', KERNEL, '6.1.0-17-amd64');
  await moduleImage(open, 'drivers/rt:v1', 'rtmod', RT_KERNEL);
  await moduleImage(locked, 'drivers/private:6.1.0-18-amd64', 'private', KERNEL);
});

t.teardown(async () => {
  await Promise.all([open?.stop(), locked?.stop()]);
  if (dir) await rm(dir, { recursive: true, force: true });
});

t.test('every Module verified: exit 0, a table and JSON', async (t) => {
  await writeFile(join(dir, 'good.yaml'), moduleYaml('gpu', `${open.host}/drivers/gpu:\${KERNEL_FULL_VERSION}`));
  const r = await run(['--kernel', KERNEL, '-f', 'good.yaml']);
  t.equal(r.code, 0, r.stderr);
  t.match(r.stdout, /^NAMESPACE\s+NAME\s+STATUS\s+STAGE\s+REASON/);
  t.match(r.stdout, /drivers\s+gpu\s+True\s+Image\s+/);
  t.match(r.stdout, /1\/1 verified for kernel 6\.1\.0-18-amd64/);
  const j = await run(['--kernel', KERNEL, '-f', 'good.yaml', '-o', 'json']);
  t.equal(j.code, 0);
  const report = JSON.parse(j.stdout);
  t.match(report, { kernel: KERNEL, platform: { os: 'linux', architecture: 'amd64' }, summary: { total: 1, verified: 1, failed: 0, error: 0 } });
  t.match(report.modules[0], { namespace: 'drivers', name: 'gpu', verificationStatus: 'True', code: 'Verified', image: `${open.host}/drivers/gpu:${KERNEL}` });
});

t.test('Modules that fail in different ways: exit 1 with distinct reasons, the others still verify', async (t) => {
  await writeFile(
    join(dir, 'mixed.yaml'),
    [
      moduleYaml('gpu', `${open.host}/drivers/gpu:\${KERNEL_FULL_VERSION}`),
      moduleYaml('missing', `${open.host}/drivers/missing:\${KERNEL_FULL_VERSION}`),
      moduleYaml('old_nic', `${open.host}/drivers/old-nic:\${KERNEL_FULL_VERSION}`),
      `apiVersion: kmm.sigs.x-k8s.io/v1beta1
kind: Module
metadata: {name: nomap, namespace: drivers}
spec:
  selector: {kubernetes.io/arch: amd64}
  moduleLoader:
    container:
      modprobe: {moduleName: nomap}
      kernelMappings:
        - literal: 5.14.0-1.el9.x86_64
          containerImage: ${open.host}/drivers/nomap:v1
          registryTLS: {insecure: true}
`,
    ].join('---\n'),
  );
  const r = await run(['--kernel', KERNEL, '-f', 'mixed.yaml', '-o', 'json']);
  t.equal(r.code, 1, r.stderr);
  const byName = new Map((JSON.parse(r.stdout).modules as { name: string; verificationStatus: string; code: string; statusReason: string }[]).map((m) => [m.name, m]));
  t.match(byName.get('gpu'), { verificationStatus: 'True', code: 'Verified' });
  t.match(byName.get('missing'), { verificationStatus: 'False', code: 'ImageNotFound' });
  t.match(byName.get('old_nic'), { verificationStatus: 'False', code: 'VermagicMismatch', statusReason: /6\.1\.0-17-amd64/ });
  t.match(byName.get('nomap'), { verificationStatus: 'False', code: 'NoKernelMapping', statusReason: /6\.1\.0-18-amd64/ });
});

t.test("a Module's imageRepoSecret comes from a Secret among the manifests; wrong credentials fail clearly", async (t) => {
  const secret = (config: string) => `apiVersion: v1
kind: Secret
metadata: {name: pull, namespace: drivers}
type: kubernetes.io/dockerconfigjson
data:
  .dockerconfigjson: ${Buffer.from(config).toString('base64')}
`;
  const mod = moduleYaml('private', `${locked.host}/drivers/private:\${KERNEL_FULL_VERSION}`, '  imageRepoSecret:\n    name: pull\n');
  await writeFile(join(dir, 'private.yaml'), `${mod}---\n${secret(locked.dockerConfigJson())}`);
  const ok = await run(['--kernel', KERNEL, '-f', 'private.yaml', '-o', 'json']);
  t.equal(ok.code, 0, ok.stdout + ok.stderr);
  await writeFile(join(dir, 'private-bad.yaml'), `${mod}---\n${secret(dockerConfigFor(locked.host, { username: 'kmm', password: 'wrong-password' }))}`);
  const bad = await run(['--kernel', KERNEL, '-f', 'private-bad.yaml', '-o', 'json']);
  t.equal(bad.code, 1);
  t.match(JSON.parse(bad.stdout).modules[0], { verificationStatus: 'False', code: 'ImageUnauthorized' });
  t.notMatch(bad.stdout + bad.stderr, /wrong-password/, 'the password never appears');
});

t.test('--release-image resolves the kernel through the driver-toolkit, --rt the real-time one', async (t) => {
  const release = await pushReleaseImage(open, '4.16', KERNEL, RT_KERNEL);
  await writeFile(join(dir, 'ocp.yaml'), moduleYaml('gpu', `${open.host}/drivers/gpu:\${KERNEL_FULL_VERSION}`));
  const r = await run(['--release-image', release.reference, '--insecure-registry', open.host, '-f', 'ocp.yaml', '-o', 'json']);
  t.equal(r.code, 0, r.stderr);
  t.match(JSON.parse(r.stdout), { kernel: KERNEL, releaseImage: release.reference, rt: false });
  await writeFile(join(dir, 'rt.yaml'), moduleYaml('rtmod', `${open.host}/drivers/rt:v1`));
  const rt = await run(['--release-image', release.reference, '--insecure-registry', open.host, '--rt', '-f', 'rt.yaml', '-o', 'json']);
  t.equal(rt.code, 0, rt.stderr + rt.stdout);
  t.match(JSON.parse(rt.stdout), { kernel: RT_KERNEL, rt: true });
  const notRelease = await run(['--release-image', `${open.host}/drivers/gpu:${KERNEL}`, '--insecure-registry', open.host, '-f', 'ocp.yaml']);
  t.equal(notRelease.code, 1);
  t.match(notRelease.stderr, /is not an OpenShift release image/);
});

t.test('bad usage and bad input exit 2 with a sentence', async (t) => {
  const cases: [string[], RegExp][] = [
    [['-f', 'good.yaml'], /exactly one of --kernel and --release-image/],
    [['--kernel', KERNEL], /give the Module manifests with -f/],
    [['--kernel', 'tesdt', '-f', 'good.yaml'], /is not a kernel version/],
    [['--kernel', KERNEL, '-f', 'nowhere.yaml'], /nowhere\.yaml: no such file or directory/],
    [['--kernel', KERNEL, '-f', 'good.yaml', '-o', 'xml'], /--output must be table or json/],
    [['--kernel', KERNEL, '-f', 'good.yaml', '--bogus'], /Unknown option '--bogus'/],
  ];
  for (const [args, message] of cases) {
    const r = await run(args);
    t.equal(r.code, 2, args.join(' '));
    t.match(r.stderr, message);
  }
  await writeFile(join(dir, 'broken.yaml'), 'apiVersion: kmm.sigs.x-k8s.io/v1beta1\nkind: Module\nmetadata: {name: x}\nspec:\n  moduleLoader:\n    container:\n      kernelMappings: nope\n');
  const broken = await run(['--kernel', KERNEL, '-f', 'broken.yaml']);
  t.equal(broken.code, 2);
  t.match(broken.stderr, /broken\.yaml \(document 1\): .*kernelMappings/);
  await writeFile(join(dir, 'unparsable.yaml'), 'a: [1,\n');
  t.equal((await run(['--kernel', KERNEL, '-f', 'unparsable.yaml'])).code, 2);
  t.equal((await run(['--help'])).code, 0);
});

t.test('--cache-dir keeps layer scans: a second check gives the same verdict', async (t) => {
  const cache = join(dir, 'cache');
  const first = await run(['--kernel', KERNEL, '-f', 'good.yaml', '--cache-dir', cache, '-o', 'json']);
  const second = await run(['--kernel', KERNEL, '-f', 'good.yaml', '--cache-dir', cache, '-o', 'json']);
  t.equal(first.code, 0);
  t.same(JSON.parse(second.stdout).modules, JSON.parse(first.stdout).modules);
});
