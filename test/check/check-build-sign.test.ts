/**
 * The Build and Sign stages through the `check` command, with nothing faked: the real CLI
 * process, Debian's buildah building FROM a static-busybox image in a real registry, busybox's
 * depmod, in-process signing with a key made by openssl, pushes, and the Image stage on what was
 * pushed.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import t from 'tap';
import { readImageFiles } from '../../src/engine/image-layers.ts';
import { parseImageReference } from '../../src/image/reference.ts';
import { createRegistryClient } from '../../src/registry/client.ts';
import { requireBuildah } from '../helpers/buildah.ts';
import { hostPlatform, pushBusyboxImage } from '../helpers/busybox-image.ts';
import { buildModuleObject, kmodModinfo, writeTemp } from '../helpers/kmod-fixtures.ts';
import { moduleYaml as moduleManifest, runCheckCli } from '../helpers/manifests.ts';
import { startRegistry, type TestRegistry } from '../helpers/registry.ts';

t.setTimeout(600_000);

const K = '6.1.0-18-amd64';
const exec = promisify(execFile);

let registry: TestRegistry;
let dir: string;

const check = (args: readonly string[]) => runCheckCli(args, dir, 300_000);

const DOCKERFILE = (base: string) => `FROM ${base}
ARG KERNEL_VERSION
ARG MOD_NAME
RUN mkdir -p /opt/lib/modules/\${KERNEL_VERSION}/extra && cp /src/\${MOD_NAME}.ko /opt/lib/modules/\${KERNEL_VERSION}/extra/ && depmod -b /opt \${KERNEL_VERSION}
`;

const moduleYaml = (name: string, mapping: string) => moduleManifest(registry, name, { match: `literal: ${K}`, mapping });

const configMap = (name: string, dockerfile: string) =>
  `apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ${name}, namespace: drivers}\ndata:\n  dockerfile: ${JSON.stringify(dockerfile)}\n`;

const BUILD = (cm: string) => `          build:
            dockerfileConfigMap: {name: ${cm}}
            baseImageRegistryTLS: {insecure: true}
`;

t.before(async () => {
  await requireBuildah();
  registry = await startRegistry();
  dir = await mkdtemp(join(tmpdir(), 'kmm-preflight-check-build-'));
  // The base image carries the modules' sources' build result, as a driver's builder image would.
  const files = [];
  for (const name of ['kbuilt', 'kbroken', 'ksigned']) {
    files.push({ path: `src/${name}.ko`, content: await buildModuleObject({ name, vermagic: `${K} SMP preempt mod_unload modversions` }) });
  }
  await pushBusyboxImage(registry, 'base/busybox:1', { files });
  await exec('openssl', ['req', '-x509', '-new', '-nodes', '-utf8', '-sha256', '-days', '3650', '-batch', '-subj', '/CN=check signing key', '-newkey', 'rsa:2048', '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem')]);
  const key = (await readFile(join(dir, 'key.pem'))).toString('base64');
  const cert = (await readFile(join(dir, 'cert.pem'))).toString('base64');
  const base = `${registry.host}/base/busybox:1`;
  await writeFile(
    join(dir, 'modules.yaml'),
    [
      moduleYaml('kbuilt', BUILD('df-ok')),
      moduleYaml('kbroken', BUILD('df-broken')),
      moduleYaml('ksigned', `${BUILD('df-ok')}          sign:
            keySecret: {name: signing-key}
            certSecret: {name: signing-cert}
            filesToSign: ['/opt/lib/modules/\${KERNEL_FULL_VERSION}/extra/ksigned.ko']
`),
      configMap('df-ok', DOCKERFILE(base)),
      configMap('df-broken', `FROM ${base}\nARG MOD_NAME\nRUN echo compiling $MOD_NAME\nRUN echo "error: implicit declaration of function" && false\n`),
      `apiVersion: v1\nkind: Secret\nmetadata: {name: signing-key, namespace: drivers}\ndata: {key: ${key}}\n`,
      `apiVersion: v1\nkind: Secret\nmetadata: {name: signing-cert, namespace: drivers}\ndata: {cert: ${cert}}\n`,
    ].join('---\n'),
  );
});

t.teardown(async () => {
  await registry?.stop();
  if (dir) await rm(dir, { recursive: true, force: true });
});

const byName = (report: { modules: { name: string }[] }) => Object.fromEntries(report.modules.map((m) => [m.name, m])) as Record<string, any>;

t.test('with --push-built-image: built and pushed images pass the Image stage; a failing Dockerfile names its step', async (t) => {
  const r = await check(['--kernel', K, '-f', 'modules.yaml', '--push-built-image', '--arch', hostPlatform().architecture, '-o', 'json']);
  t.equal(r.code, 1, `one Module fails, so exit 1\n${r.stderr}`);
  const m = byName(JSON.parse(r.stdout));
  // The build pushes the image; the Image stage, run again, finds the module in it.
  t.match(m['kbuilt'], { verificationStatus: 'True', code: 'Verified' }, m['kbuilt']?.statusReason);
  t.match(m['kbuilt'].statusReason, /module kbuilt found in image .* \(extra\/kbuilt\.ko, vermagic ok\)/, 'busybox depmod listed it in modules.dep');
  t.match(m['kbroken'], { verificationStatus: 'False', stage: 'Build', code: 'BuildFailed' });
  t.match(m['kbroken'].statusReason, /^build failed at step 4\/4 \(RUN echo "error: implicit declaration of function" && false\): exit status 1/, 'the failing step');
  t.match(m['kbroken'].statusReason, /error: implicit declaration of function/, 'with the last lines of the build output');
  t.match(m['ksigned'], { verificationStatus: 'True', stage: 'Sign' }, m['ksigned']?.statusReason);
  t.match(m['ksigned'].statusReason, /signed 1 file/);

  // The signed image in the registry: the module carries a signature modinfo reads.
  const client = createRegistryClient();
  t.teardown(() => client.close());
  const { files } = await readImageFiles(client, `${registry.host}/drivers/ksigned:${K}`, { insecure: true }, hostPlatform(), (p) => p.endsWith('/extra/ksigned.ko'));
  t.equal(files.length, 1);
  const ko = await writeTemp('ksigned.ko', files[0]!.data);
  t.teardown(ko.cleanup);
  t.equal(await kmodModinfo('signer', ko.path), 'check signing key');
  t.equal(await kmodModinfo('sig_hashalgo', ko.path), 'sha256');
  t.ok((await client.resolveImage(parseImageReference(`${registry.host}/drivers/kbuilt:${K}`), { insecure: true }, hostPlatform())).digest, 'the built image was pushed');
});

t.test('without --push-built-image a finished build verifies and nothing is pushed', async (t) => {
  await writeFile(join(dir, 'one.yaml'), [moduleYaml('kother', BUILD('df-ok')), configMap('df-ok', DOCKERFILE(`${registry.host}/base/busybox:1`).replaceAll('${MOD_NAME}', 'kbuilt'))].join('---\n'));
  const r = await check(['--kernel', K, '-f', 'one.yaml', '--arch', hostPlatform().architecture, '-o', 'json']);
  t.equal(r.code, 0, r.stderr);
  const m = byName(JSON.parse(r.stdout));
  t.match(m['kother'], { verificationStatus: 'True', stage: 'Build', code: 'Built' });
  t.match(m['kother'].statusReason, /not pushed \(pushBuiltImage is false\)/);
  const client = createRegistryClient();
  t.teardown(() => client.close());
  await t.rejects(client.resolveImage(parseImageReference(`${registry.host}/drivers/kother:${K}`), { insecure: true }, hostPlatform()), { code: 'NotFound' }, 'nothing was pushed');
});

t.test('--builder none: a Module that needs a build is not verified, and the reason says why', async (t) => {
  const r = await check(['--kernel', K, '-f', 'one.yaml', '--builder', 'none', '-o', 'json']);
  t.equal(r.code, 1);
  const m = byName(JSON.parse(r.stdout));
  t.match(m['kother'], { verificationStatus: 'False', stage: 'Build', code: 'BuilderUnavailable', statusReason: /builds are turned off \(--builder none\)/ });
});
