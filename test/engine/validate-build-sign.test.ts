/**
 * The order and hand-offs of the stages (DESIGN §4) with the stages replaced by recorders: Image
 * first; Build only when Image failed and there is a build section; Sign only after a successful
 * Build or from `unsignedImage`; the temporary image when a Sign stage follows; pushes only with
 * pushBuiltImage; a pushed image put through the Image stage again; clean-ups handed back.
 * The real stages are tested on their own and end to end (test/e2e/build-jobs.test.ts).
 */
import t from 'tap';
import type { Builder, BuildOutcome, BuildRequest } from '../../src/build/types.ts';
import type { KmmModule } from '../../src/engine/module.ts';
import type { SignStage, SignStageInput, SignStageOutcome } from '../../src/engine/sign-stage.ts';
import type { ImageStage, ImageStageInput, StageOutcome } from '../../src/engine/types.ts';
import { unsignedImageName, validateModuleForKernel, type BuildSignDeps } from '../../src/engine/validate.ts';

const K = '6.1.0-18-amd64';
const IMAGE = `registry.example:5000/drivers/m:${K}`;

function module(container: Record<string, unknown>): KmmModule {
  return {
    metadata: { name: 'm', namespace: 'drivers' },
    spec: {
      selector: {},
      imageRepoSecret: { name: 'pull' },
      moduleLoader: {
        container: {
          modprobe: { moduleName: 'm' },
          kernelMappings: [{ literal: K, containerImage: 'registry.example:5000/drivers/m:${KERNEL_FULL_VERSION}' }],
          ...container,
        },
      },
    },
  } as unknown as KmmModule;
}

const BUILD = { build: { dockerfileConfigMap: { name: 'df' }, secrets: [{ name: 'tok' }] } };
const SIGN = { sign: { keySecret: { name: 'key' }, certSecret: { name: 'cert' }, filesToSign: ['/opt/lib/modules/${KERNEL_FULL_VERSION}/m.ko'] } };
const UNSIGNED = { sign: { ...SIGN.sign, unsignedImage: 'registry.example:5000/drivers/m-unsigned:${KERNEL_FULL_VERSION}' } };

/** An Image stage that answers per image, True once an image has been "pushed". */
function imageStage(present: Set<string>) {
  const calls: ImageStageInput[] = [];
  const stage: ImageStage = {
    async run(input): Promise<StageOutcome> {
      calls.push(input);
      return present.has(input.image)
        ? { status: 'True', code: 'ModuleFound', reason: `module m found in ${input.image}` }
        : { status: 'False', code: 'ImageNotFound', reason: `image ${input.image} not found` };
    },
  };
  return { stage, calls };
}

function builder(outcome: (req: BuildRequest) => BuildOutcome) {
  const requests: BuildRequest[] = [];
  const released: string[] = [];
  const b: Builder = {
    kind: 'test',
    async run(req) {
      requests.push(req);
      return outcome(req);
    },
    async release(key) {
      released.push(key);
    },
    onUpdate() {},
    async close() {},
  };
  return { b, requests, released };
}

function signStage(outcome: (input: SignStageInput) => SignStageOutcome, pushed?: Set<string>) {
  const inputs: SignStageInput[] = [];
  const s: SignStage = {
    async run(input) {
      inputs.push(input);
      const o = outcome(input);
      if (o.status === 'True' && input.push) pushed?.add(input.outputImage);
      return o;
    },
  };
  return { s, inputs };
}

const SIGNED: SignStageOutcome = { status: 'True', code: 'Signed', reason: 'signed 1 file' };

function deps(o: { present?: Set<string>; builder?: Builder; sign?: SignStage; push?: boolean; secrets?: Record<string, Record<string, Buffer>>; configMaps?: Record<string, Record<string, string>> }) {
  const image = imageStage(o.present ?? new Set());
  const secrets = o.secrets ?? { 'drivers/tok': { token: Buffer.from('t') }, 'drivers/key': { key: Buffer.from('KEY') }, 'drivers/cert': { cert: Buffer.from('CERT') } };
  const configMaps = o.configMaps ?? { 'drivers/df': { dockerfile: 'FROM scratch\n' } };
  const buildSign: BuildSignDeps = {
    key: 'pfv/upgrade|drivers/m',
    owner: { apiVersion: 'kmm.sigs.x-k8s.io/v1beta2', kind: 'PreflightValidation', name: 'upgrade', uid: 'u-1' },
    push: o.push ?? false,
    ...(o.builder ? { builder: o.builder } : { noBuilderReason: 'no builder in this test' }),
    signStage: o.sign ?? signStage(() => SIGNED).s,
    configMapData: (ns, n) => configMaps[`${ns}/${n}`],
    secretData: (ns, n) => secrets[`${ns}/${n}`],
    pullSecretText: () => '{"auths":{}}',
  };
  return {
    image,
    deps: { imageStage: image.stage, platform: { os: 'linux', architecture: 'amd64' }, credentialsFor: async () => undefined, buildSign },
  };
}

t.test('an image that passes ends the validation: no build, no sign', async (t) => {
  const bld = builder(() => ({ state: 'Running', reason: 'x' }));
  const sgn = signStage(() => SIGNED);
  const { deps: d } = deps({ present: new Set([IMAGE]), builder: bld.b, sign: sgn.s });
  const v = await validateModuleForKernel(module({ ...BUILD, ...SIGN }), K, d);
  t.match(v, { status: 'True', stage: 'Image' });
  t.equal(bld.requests.length, 0);
  t.equal(sgn.inputs.length, 0);
  // A build that pushed the image before its end was seen is cleaned up all the same.
  await v.release!();
  t.same(bld.released, ['pfv/upgrade|drivers/m']);
});

t.test('a running build is Unknown in stage Build; its request carries the Module and the kernel', async (t) => {
  const bld = builder(() => ({ state: 'Running', reason: 'build Job drivers/m-build-1 running for 5 s' }));
  const { deps: d } = deps({ builder: bld.b, push: true });
  const v = await validateModuleForKernel(module(BUILD), K, d);
  t.match(v, { status: 'Unknown', stage: 'Build', code: 'Building', reason: /running for 5 s/ });
  t.equal(v.release, undefined, 'nothing to clean up while it runs');
  const req = bld.requests[0]!;
  t.match(req, { key: 'pfv/upgrade|drivers/m', namespace: 'drivers', moduleName: 'm', kernel: K, dockerfile: 'FROM scratch\n', dockerfileConfigMap: 'df', destination: IMAGE, push: true, imageRepoSecret: 'pull', secrets: ['tok'] });
  t.same(req.secretData!('tok'), { token: Buffer.from('t') });
  t.ok(req.buildArgs.some((a) => a.name === 'KERNEL_FULL_VERSION' && a.value === K));
});

t.test('the build fingerprint follows the Dockerfile, the build secrets and the Module', async (t) => {
  const bld = builder(() => ({ state: 'Running', reason: 'r' }));
  await validateModuleForKernel(module(BUILD), K, deps({ builder: bld.b }).deps);
  await validateModuleForKernel(module(BUILD), K, deps({ builder: bld.b }).deps);
  await validateModuleForKernel(module(BUILD), K, deps({ builder: bld.b, configMaps: { 'drivers/df': { dockerfile: 'FROM scratch\nRUN true\n' } } }).deps);
  await validateModuleForKernel(module(BUILD), K, deps({ builder: bld.b, secrets: { 'drivers/tok': { token: Buffer.from('rotated') } } }).deps);
  await validateModuleForKernel(module({ build: { ...BUILD.build, buildArgs: [{ name: 'DEBUG', value: '1' }] } }), K, deps({ builder: bld.b }).deps);
  const [a, b, c, d, e] = bld.requests.map((r) => r.fingerprint);
  t.equal(a, b, 'the same inputs, the same build');
  t.not(c, a, 'a changed Dockerfile is another build');
  t.not(d, a, 'a rotated build secret is another build');
  t.not(e, a, "a change of the Module's build section is another build");
});

t.test('a pushed build is checked by the Image stage; the Job is released once recorded', async (t) => {
  const present = new Set<string>();
  const bld = builder((req) => {
    present.add(req.destination);
    return { state: 'Succeeded', image: req.destination, pushed: true, reason: `built and pushed ${req.destination}` };
  });
  const { deps: d, image } = deps({ present, builder: bld.b, push: true });
  const v = await validateModuleForKernel(module(BUILD), K, d);
  t.match(v, { status: 'True', stage: 'Build', reason: new RegExp(`built and pushed .*; module m found in`) });
  t.same(image.calls.map((c) => c.image), [IMAGE, IMAGE], 'Image stage before and after the build');
  await v.release!();
  t.same(bld.released, ['pfv/upgrade|drivers/m']);
});

t.test('a pushed build that still lacks the module is False, saying so', async (t) => {
  const bld = builder((req) => ({ state: 'Succeeded', image: req.destination, pushed: true, reason: 'built and pushed' }));
  const v = await validateModuleForKernel(module(BUILD), K, deps({ builder: bld.b, push: true }).deps);
  t.match(v, { status: 'False', stage: 'Build', reason: /built and pushed, but the pushed image does not pass the Image stage: image .* not found/ });
  t.type(v.release, 'function');
});

t.test('without pushBuiltImage a finished build verifies and nothing is checked in the registry', async (t) => {
  const bld = builder((req) => ({ state: 'Succeeded', image: req.destination, pushed: false, reason: 'built (not pushed: pushBuiltImage is false)' }));
  const { deps: d, image } = deps({ builder: bld.b, push: false });
  const v = await validateModuleForKernel(module(BUILD), K, d);
  t.match(v, { status: 'True', stage: 'Build', code: 'Built' });
  t.equal(bld.requests[0]!.push, false);
  t.equal(image.calls.length, 1);
});

t.test('failed, unavailable and erroring builds', async (t) => {
  const failed = await validateModuleForKernel(module(BUILD), K, deps({ builder: builder(() => ({ state: 'Failed', code: 'BuildFailed', reason: 'step 3 failed' })).b }).deps);
  t.match(failed, { status: 'False', stage: 'Build', code: 'BuildFailed', reason: 'step 3 failed' });
  t.type(failed.release, 'function', 'a failed Job is removed once recorded');
  const unavailable = await validateModuleForKernel(module(BUILD), K, deps({ builder: builder(() => ({ state: 'Unavailable', code: 'BuilderUnavailable', reason: 'buildah is not installed' })).b }).deps);
  t.match(unavailable, { status: 'False', code: 'BuilderUnavailable' }, 'never passed');
  const error = await validateModuleForKernel(module(BUILD), K, deps({ builder: builder(() => ({ state: 'Error', code: 'BuildJobUnavailable', reason: 'kube-apiserver answered 503' })).b }).deps);
  t.match(error, { status: 'Error', stage: 'Build' });
  const none = await validateModuleForKernel(module(BUILD), K, deps({}).deps);
  t.match(none, { status: 'False', stage: 'Build', code: 'BuilderUnavailable', reason: /no builder in this test/ });
});

t.test('a build cannot start without its Dockerfile or its secrets', async (t) => {
  const bld = builder(() => ({ state: 'Running', reason: 'r' }));
  const noCm = await validateModuleForKernel(module(BUILD), K, deps({ builder: bld.b, configMaps: {} }).deps);
  t.match(noCm, { status: 'False', stage: 'Build', code: 'DockerfileMissing', reason: /ConfigMap drivers\/df does not exist or has no "dockerfile" key/ });
  const noKey = await validateModuleForKernel(module(BUILD), K, deps({ builder: bld.b, configMaps: { 'drivers/df': { Dockerfile: 'x' } } }).deps);
  t.match(noKey, { code: 'DockerfileMissing' });
  const noSecret = await validateModuleForKernel(module(BUILD), K, deps({ builder: bld.b, secrets: {} }).deps);
  t.match(noSecret, { status: 'False', code: 'BuildSecretMissing', reason: /Secret drivers\/tok/ });
  t.equal(bld.requests.length, 0, 'no build was started');
});

t.test('build then sign: the build goes to a temporary image, which the Sign stage signs into containerImage', async (t) => {
  const present = new Set<string>();
  const bld = builder((req) => ({ state: 'Succeeded', image: req.destination, pushed: true, reason: `built and pushed ${req.destination}` }));
  const sgn = signStage(() => SIGNED, present);
  const v = await validateModuleForKernel(module({ ...BUILD, ...SIGN }), K, deps({ present, builder: bld.b, sign: sgn.s, push: true }).deps);
  const temp = unsignedImageName(IMAGE, 'drivers', 'm');
  t.equal(bld.requests[0]!.destination, temp);
  t.not(temp, IMAGE);
  t.match(temp, /^registry\.example:5000\/drivers\/m:drivers_m_kmm_preflight_unsigned_[0-9a-f]{8}$/);
  t.not(unsignedImageName(`registry.example:5000/drivers/m:6.2.0`, 'drivers', 'm'), temp, 'another kernel, another temporary image');
  t.match(sgn.inputs[0], { inputImage: temp, outputImage: IMAGE, push: true, key: Buffer.from('KEY'), certificate: Buffer.from('CERT'), filesToSign: [`/opt/lib/modules/${K}/m.ko`], moduleName: 'm', kernel: K, dirName: '/opt' });
  t.match(v, { status: 'True', stage: 'Sign', reason: /signed 1 file; module m found/ });
  t.type(v.release, 'function');
});

t.test('without pushBuiltImage the Sign stage has no built image to sign', async (t) => {
  const bld = builder((req) => ({ state: 'Succeeded', image: req.destination, pushed: false, reason: 'built (not pushed)' }));
  const sgn = signStage(() => SIGNED);
  const v = await validateModuleForKernel(module({ ...BUILD, ...SIGN }), K, deps({ builder: bld.b, sign: sgn.s, push: false }).deps);
  t.match(v, { status: 'False', stage: 'Sign', code: 'SignInputNotPushed', reason: /set pushBuiltImage: true/ });
  t.equal(sgn.inputs.length, 0);
});

t.test('sign only: the unsigned image is signed; not pushed without pushBuiltImage', async (t) => {
  const sgn = signStage(() => ({ ...SIGNED, reason: 'signed 1 file, verified, not pushed (pushBuiltImage is false)' }));
  const { deps: d, image } = deps({ sign: sgn.s, push: false });
  const v = await validateModuleForKernel(module(UNSIGNED), K, d);
  t.match(sgn.inputs[0], { inputImage: `registry.example:5000/drivers/m-unsigned:${K}`, push: false });
  t.match(v, { status: 'True', stage: 'Sign', reason: /not pushed/ });
  t.equal(image.calls.length, 1, 'nothing pushed, nothing to check again');
});

t.test('sign outcomes and signing secrets', async (t) => {
  const wrong = signStage(() => ({ status: 'False', code: 'KeyMismatch', reason: 'the key does not match the certificate' }));
  t.match(await validateModuleForKernel(module(UNSIGNED), K, deps({ sign: wrong.s }).deps), { status: 'False', stage: 'Sign', code: 'KeyMismatch' });
  const noKey = await validateModuleForKernel(module(UNSIGNED), K, deps({ secrets: { 'drivers/cert': { cert: Buffer.from('C') } } }).deps);
  t.match(noKey, { status: 'False', stage: 'Sign', code: 'SigningSecretMissing', reason: /signing key Secret drivers\/key \(sign.keySecret\) does not exist/ });
  const noCertKey = await validateModuleForKernel(module(UNSIGNED), K, deps({ secrets: { 'drivers/key': { key: Buffer.from('K') }, 'drivers/cert': { 'tls.crt': Buffer.from('C') } } }).deps);
  t.match(noCertKey, { code: 'SigningSecretMissing', reason: /Secret drivers\/cert \(sign.certSecret\) has no "cert" key/ });
  const noInput = await validateModuleForKernel(module(SIGN), K, deps({}).deps);
  t.match(noInput, { status: 'False', stage: 'Sign', code: 'UnsignedImageMissing' });
});

t.test('without Build and Sign stages configured, a Module needing them is False, saying so', async (t) => {
  const { deps: d } = deps({});
  const { buildSign: _, ...noStages } = d;
  const v = await validateModuleForKernel(module(BUILD), K, noStages);
  t.match(v, { status: 'False', stage: 'Image', reason: /the Build stage is not available here/ });
});
