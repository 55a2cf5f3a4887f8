import t, { type Test } from 'tap';
import { readFileSync } from 'node:fs';
import type { KubeObject } from '../../src/api/resources.ts';
import { API_VERSION, type ModuleStatus, type VerificationStatus } from '../../src/api/schema.ts';
import { nextEntry, summarize } from '../../src/controller/status.ts';
import type { AdmissionReviewResponse } from '../../src/gate/admission-review.ts';
import {
  MAX_MESSAGE_BYTES,
  reviewClusterVersionUpdate,
  type AdmissionOutcome,
  type GateInputs,
  type GateModule,
  type GatePolicy,
} from '../../src/gate/upgrade-gate.ts';
import type { Status } from '../../src/server/errors.ts';

// ---------------------------------------------------------------------------------------------
// Fixtures and fakes
// ---------------------------------------------------------------------------------------------

type Json = Record<string, any>;
const fixture = (name: string): Json => JSON.parse(readFileSync(new URL(`../fixtures/admission/${name}.json`, import.meta.url), 'utf8'));

const REPO = 'quay.io/openshift-release-dev/ocp-release';
const IMAGE_4_16_2 = `${REPO}@sha256:095d965da03ef0bc49dc541c5c26be3ca81fc4ab52ff7b5ec71514d1c1b651bc`;
const IMAGE_4_16_3 = `${REPO}@sha256:a76d252a02cf400d13529881caac7fa54c0757fd7e1fec0a444305e8ee6578b4`;
const DIGEST_4_16_2 = IMAGE_4_16_2.slice(IMAGE_4_16_2.indexOf('@') + 1);
const KERNEL = '5.14.0-427.24.1.el9_4.x86_64';

const ENFORCE: GatePolicy = { mode: 'enforce', honourForce: true };
const ENFORCE_NO_FORCE: GatePolicy = { mode: 'enforce', honourForce: false };
const WARN: GatePolicy = { mode: 'warn', honourForce: false };

const VALIDATED_AT = new Date('2024-07-18T10:00:00Z');

type Entry = readonly [namespace: string, name: string, status: VerificationStatus, reason?: string];

/** A PreflightValidationOCP as the controller stores it (status from the controller's own functions). */
function pfvo(
  name: string,
  releaseImage: string,
  entries: readonly Entry[],
  o: { generation?: number; observedGeneration?: number | null; created?: string; deleting?: boolean; rv?: string } = {},
): KubeObject {
  const generation = o.generation ?? 1;
  const modules: ModuleStatus[] = entries.map(([namespace, n, s, reason]) =>
    nextEntry(
      undefined,
      { namespace, name: n },
      { verificationStatus: s, verificationStage: s === 'True' || s === 'False' ? 'Done' : 'Image', statusReason: reason ?? (s === 'True' ? `verified for kernel ${KERNEL}` : 'waiting') },
      VALIDATED_AT,
    ),
  );
  const status = summarize(undefined, { modules, generation: o.observedGeneration ?? generation, kernelVersion: KERNEL }, VALIDATED_AT);
  if (o.observedGeneration === null) delete status.observedGeneration;
  return {
    apiVersion: API_VERSION,
    kind: 'PreflightValidationOCP',
    metadata: {
      name,
      uid: `uid-${name}`,
      resourceVersion: o.rv ?? '2001',
      generation,
      creationTimestamp: o.created ?? '2024-07-18T09:00:00Z',
      ...(o.deleting ? { deletionTimestamp: '2024-07-18T11:00:00Z', finalizers: ['kmm.sigs.x-k8s.io/preflight'] } : {}),
    },
    spec: { releaseImage, pushBuiltImage: false, useRTKernel: false },
    status,
  };
}

const mod = (namespace: string, name: string, creationTimestamp?: string): GateModule => ({
  metadata: { namespace, name, ...(creationTimestamp ? { creationTimestamp } : {}) },
});

const MODULES = [mod('gpu-operator', 'nvidia-gds'), mod('openshift-kmm', 'intel-dgpu'), mod('storage', 'lustre-client')];
const ALL_TRUE: Entry[] = MODULES.map((m) => [m.metadata.namespace!, m.metadata.name, 'True']);
const NO_MAPPING = `no kernel mapping of the Module matches kernel ${KERNEL}`;

function inputs(validations: readonly KubeObject[], modules: readonly GateModule[] = MODULES, digests: Record<string, string> = {}): GateInputs & { asked: string[] } {
  const asked: string[] = [];
  return {
    asked,
    validations: () => validations,
    modules: () => modules,
    digestOf: (image) => {
      asked.push(image);
      return digests[image];
    },
  };
}

/** Inputs the gate must not touch: any read fails the decision (it would fail closed). */
const untouchable: GateInputs = {
  validations: () => {
    throw new Error('validations() read');
  },
  modules: () => {
    throw new Error('modules() read');
  },
  digestOf: () => {
    throw new Error('digestOf() read');
  },
};

const review = (out: AdmissionOutcome) => {
  if (out.status !== 200) throw new Error(`expected 200, got ${out.status}: ${JSON.stringify(out.body)}`);
  const body = out.body as AdmissionReviewResponse;
  return body.response;
};

function checkEnvelope(t: Test, out: AdmissionOutcome, uid: string) {
  t.equal(out.status, 200);
  const body = out.body as AdmissionReviewResponse;
  t.equal(body.apiVersion, 'admission.k8s.io/v1');
  t.equal(body.kind, 'AdmissionReview');
  t.equal(body.response.uid, uid, 'the uid is echoed');
  t.notOk('patch' in body.response, 'never a patch');
  t.notOk('patchType' in body.response, 'never a patchType');
}

const withDesiredUpdate = (base: Json, du: unknown, old?: unknown): Json => {
  const r = structuredClone(base);
  if (du === undefined) delete r.request.object.spec.desiredUpdate;
  else r.request.object.spec.desiredUpdate = du;
  if (old !== undefined) r.request.oldObject.spec.desiredUpdate = old;
  return r;
};

const messageOf = (out: AdmissionOutcome) => review(out).status?.message ?? '';

// ---------------------------------------------------------------------------------------------
// Verdicts
// ---------------------------------------------------------------------------------------------

t.test('an upgrade to a fully verified release is allowed', async (t) => {
  const body = fixture('update-to-4.16.2-by-image');
  const out = reviewClusterVersionUpdate(body, inputs([pfvo('ocp-4-16-2', IMAGE_4_16_2, ALL_TRUE)]), ENFORCE);
  checkEnvelope(t, out, body.request.uid);
  const r = review(out);
  t.equal(r.allowed, true);
  t.equal(r.status, undefined);
  t.equal(r.warnings, undefined, 'no warnings when all is well');
  t.match(r.auditAnnotations, { release: IMAGE_4_16_2, verdict: 'AllModulesVerified', validation: 'ocp-4-16-2', decision: 'allowed' });
});

t.test('an upgrade to a release with one failed Module is denied, naming it with its reason', async (t) => {
  const body = fixture('update-to-4.16.2-by-image');
  const entries: Entry[] = [...ALL_TRUE.slice(0, 2), ['storage', 'lustre-client', 'False', NO_MAPPING]];
  const out = reviewClusterVersionUpdate(body, inputs([pfvo('ocp-4-16-2', IMAGE_4_16_2, entries)]), ENFORCE);
  checkEnvelope(t, out, body.request.uid);
  const r = review(out);
  t.equal(r.allowed, false);
  t.match(r.status, { status: 'Failure', code: 403, reason: 'Forbidden' });
  const m = messageOf(out);
  t.match(m, `the update to 4.16.2 (${IMAGE_4_16_2})`, 'names the release');
  t.match(m, 'PreflightValidationOCP ocp-4-16-2 has 1 of 3 Modules not verified', 'names the validation');
  t.match(m, `storage/lustre-client: ${NO_MAPPING}`, 'names the failing Module with its reason');
  t.notMatch(m, 'nvidia-gds', 'verified Modules are not named');
  t.match(m, 'kubectl get pfvo ocp-4-16-2 -o yaml', 'says how to look');
  t.match(m, 'kubectl wait pfvo/ocp-4-16-2 --for=condition=Verified');
  t.match(m, 'To override, set spec.desiredUpdate.force: true.', 'mentions the override the policy honours');
  t.notMatch(m, 'and 0 more');
  t.ok(Buffer.byteLength(m) <= MAX_MESSAGE_BYTES);
  t.match(r.auditAnnotations, { verdict: 'ModulesNotVerified', decision: 'denied', validation: 'ocp-4-16-2' });
});

t.test('an upgrade to a release without a PreflightValidationOCP is denied, saying which object to create', async (t) => {
  const body = fixture('update-to-4.16.2-by-image');
  const other = pfvo('ocp-4-16-3', IMAGE_4_16_3, ALL_TRUE);
  const out = reviewClusterVersionUpdate(body, inputs([other]), ENFORCE);
  t.equal(review(out).allowed, false);
  const m = messageOf(out);
  t.match(m, `no PreflightValidationOCP validates release ${IMAGE_4_16_2}`);
  const json = /echo '([^']+)' \| kubectl apply -f -/.exec(m)?.[1];
  t.ok(json, 'a ready-to-apply one-liner');
  t.same(JSON.parse(json!), {
    apiVersion: 'kmm.sigs.x-k8s.io/v1beta2',
    kind: 'PreflightValidationOCP',
    metadata: { name: 'ocp-4-16-2' },
    spec: { releaseImage: IMAGE_4_16_2 },
  });
  t.match(m, 'kubectl wait pfvo/ocp-4-16-2 --for=condition=Verified');
  t.ok(Buffer.byteLength(m) <= MAX_MESSAGE_BYTES);
  t.match(review(out).auditAnnotations, { verdict: 'NoValidation', decision: 'denied' });
});

t.test('a validation naming a tag that resolves to the target digest counts; an unknown digest does not', async (t) => {
  const body = fixture('update-to-4.16.2-by-image');
  const tag = `${REPO}:4.16.2-x86_64`;
  const v = pfvo('ocp-4-16-2', tag, ALL_TRUE);
  const known = inputs([v], MODULES, { [tag]: DIGEST_4_16_2 });
  t.equal(review(reviewClusterVersionUpdate(body, known, ENFORCE)).allowed, true);
  t.ok(known.asked.includes(tag), 'the tag was looked up as written');

  const unknown = reviewClusterVersionUpdate(body, inputs([v]), ENFORCE);
  t.equal(review(unknown).allowed, false);
  t.match(messageOf(unknown), 'the digest of the release image tag of ocp-4-16-2 is not known yet');
  t.match(messageOf(unknown), 'retry in a minute');
  t.match(review(unknown).auditAnnotations, { verdict: 'ValidationDigestUnknown' });
});

t.test('a target named by tag is matched through its digest, and refused while the digest is unknown', async (t) => {
  const body = fixture('update-to-4.16.2-by-tag');
  const tag = body.request.object.spec.desiredUpdate.image as string;
  const v = pfvo('ocp-4-16-2', IMAGE_4_16_2, ALL_TRUE);
  t.equal(review(reviewClusterVersionUpdate(body, inputs([v], MODULES, { [tag]: DIGEST_4_16_2 }), ENFORCE)).allowed, true);
  const out = reviewClusterVersionUpdate(body, inputs([v]), ENFORCE);
  t.equal(review(out).allowed, false);
  t.match(messageOf(out), `the digest of the release image tag ${tag} is not known yet`);
  t.match(review(out).auditAnnotations, { verdict: 'ReleaseDigestUnknown' });
});

t.test('the same digest in another repository (a mirror) matches', async (t) => {
  const body = fixture('update-to-4.16.2-by-image');
  const mirrored = `mirror.example.internal:5000/ocp4/openshift4@${DIGEST_4_16_2}`;
  t.equal(review(reviewClusterVersionUpdate(body, inputs([pfvo('mirrored', mirrored, ALL_TRUE)]), ENFORCE)).allowed, true);
});

t.test('a version alone is resolved through status.availableUpdates', async (t) => {
  const body = fixture('update-to-4.16.2-by-version');
  t.equal(review(reviewClusterVersionUpdate(body, inputs([pfvo('ocp-4-16-2', IMAGE_4_16_2, ALL_TRUE)]), ENFORCE)).allowed, true);
  const wrong = reviewClusterVersionUpdate(body, inputs([pfvo('ocp-4-16-3', IMAGE_4_16_3, ALL_TRUE)]), ENFORCE);
  t.equal(review(wrong).allowed, false, 'only the listed image of 4.16.2 matches');
  t.match(messageOf(wrong), `no PreflightValidationOCP validates release ${IMAGE_4_16_2}`);
});

t.test('a version alone is resolved through status.conditionalUpdates', async (t) => {
  const body = fixture('update-to-4.16.3-conditional');
  t.equal(review(reviewClusterVersionUpdate(body, inputs([pfvo('ocp-4-16-3', IMAGE_4_16_3, ALL_TRUE)]), ENFORCE)).allowed, true);
  const wrong = reviewClusterVersionUpdate(body, inputs([pfvo('ocp-4-16-2', IMAGE_4_16_2, ALL_TRUE)]), ENFORCE);
  t.equal(review(wrong).allowed, false);
  t.match(messageOf(wrong), IMAGE_4_16_3);
});

t.test("a version is looked up in the old object's status when the new one lists nothing", async (t) => {
  const body = fixture('update-to-4.16.2-by-version');
  delete body.request.object.status;
  t.equal(review(reviewClusterVersionUpdate(body, inputs([pfvo('ocp-4-16-2', IMAGE_4_16_2, ALL_TRUE)]), ENFORCE)).allowed, true);
});

t.test('a version that neither status lists is denied, saying so', async (t) => {
  const body = withDesiredUpdate(fixture('update-to-4.16.2-by-version'), { version: '4.17.0' });
  const out = reviewClusterVersionUpdate(body, inputs([pfvo('ocp-4-16-2', IMAGE_4_16_2, ALL_TRUE)]), ENFORCE);
  t.equal(review(out).allowed, false);
  t.match(review(out).status, { code: 403, reason: 'Forbidden' });
  t.match(messageOf(out), 'spec.desiredUpdate.version 4.17.0 is not among the available or conditional updates of ClusterVersion version');
  t.equal(review(reviewClusterVersionUpdate(body, inputs([]), WARN)).allowed, true, 'warn mode lets it through');
});

// ---------------------------------------------------------------------------------------------
// Policy
// ---------------------------------------------------------------------------------------------

t.test('warn mode allows an unverified update with short warnings', async (t) => {
  const body = fixture('update-to-4.16.2-by-image');
  const entries: Entry[] = [['gpu-operator', 'nvidia-gds', 'False', `${NO_MAPPING}; ${'x'.repeat(300)}`], ['openshift-kmm', 'intel-dgpu', 'Error', 'pull of quay.io/acme/intel-dgpu:5.14 timed out'], ['storage', 'lustre-client', 'True']];
  const out = reviewClusterVersionUpdate(body, inputs([pfvo('ocp-4-16-2', IMAGE_4_16_2, entries)]), WARN);
  checkEnvelope(t, out, body.request.uid);
  const r = review(out);
  t.equal(r.allowed, true);
  t.equal(r.status, undefined);
  t.ok(r.warnings && r.warnings.length >= 3 && r.warnings.length <= 6, `a few warnings (${r.warnings?.length})`);
  for (const w of r.warnings ?? []) t.ok(w.length < 256, `short: ${w.length}`);
  const all = (r.warnings ?? []).join('\n');
  t.match(all, 'kmm-preflight (warn mode) would refuse the update to 4.16.2');
  t.match(all, `gpu-operator/nvidia-gds: ${NO_MAPPING}`);
  t.match(all, 'openshift-kmm/intel-dgpu: error (retried): pull of quay.io/acme/intel-dgpu:5.14 timed out');
  t.match(all, 'kubectl get pfvo ocp-4-16-2 -o yaml');
  t.match(r.auditAnnotations, { decision: 'warned' });
  const noValidation = review(reviewClusterVersionUpdate(body, inputs([]), WARN));
  t.equal(noValidation.allowed, true);
  for (const w of noValidation.warnings ?? []) t.ok(w.length < 256, `short: ${w.length}`);
  t.match((noValidation.warnings ?? []).join(' '), 'kubectl apply -f -');
});

t.test('desiredUpdate.force bypasses the gate only when the policy honours it', async (t) => {
  const body = fixture('update-to-4.16.2-forced');
  const failing = inputs([pfvo('ocp-4-16-2', IMAGE_4_16_2, [...ALL_TRUE.slice(1), ['gpu-operator', 'nvidia-gds', 'False', NO_MAPPING]])]);

  const honoured = review(reviewClusterVersionUpdate(body, failing, ENFORCE));
  t.equal(honoured.allowed, true);
  t.match(honoured.warnings?.[0], /^kmm-preflight: gate bypassed by spec\.desiredUpdate\.force/);
  t.match(honoured.auditAnnotations, { decision: 'forced', verdict: 'ModulesNotVerified' });

  const ignored = reviewClusterVersionUpdate(body, failing, ENFORCE_NO_FORCE);
  t.equal(review(ignored).allowed, false);
  t.match(messageOf(ignored), 'spec.desiredUpdate.force does not bypass this gate.');
  t.notMatch(messageOf(ignored), 'To override');

  const warnNoForce = review(reviewClusterVersionUpdate(body, failing, WARN));
  t.match(warnNoForce.warnings?.[0], /warn mode/, 'in warn mode an ignored force is just a warned update');

  const unforced = withDesiredUpdate(body, { image: IMAGE_4_16_2, force: false });
  t.equal(review(reviewClusterVersionUpdate(unforced, failing, ENFORCE)).allowed, false, 'without force the honouring policy still refuses');
});

// ---------------------------------------------------------------------------------------------
// What is not gated
// ---------------------------------------------------------------------------------------------

t.test('an unrelated ClusterVersion update is allowed without reading any state', async (t) => {
  const body = fixture('channel-change');
  const out = reviewClusterVersionUpdate(body, untouchable, ENFORCE);
  checkEnvelope(t, out, body.request.uid);
  t.equal(review(out).allowed, true);
  t.equal(out.error, undefined);
  t.equal(review(out).auditAnnotations, undefined);

  const onlyForce = withDesiredUpdate(body, { ...body.request.object.spec.desiredUpdate, force: true });
  t.equal(review(reviewClusterVersionUpdate(onlyForce, untouchable, ENFORCE)).allowed, true, 'only force changed: the same target');

  const addedImage = withDesiredUpdate(body, { version: '4.16.2', image: IMAGE_4_16_2 }, { version: '4.16.2' });
  t.equal(review(reviewClusterVersionUpdate(addedImage, inputs([]), ENFORCE)).allowed, true, 'version and image naming the same release as the version before');

  // During an update the CVO lists the updates from the new version: the target is no longer listed.
  const during = withDesiredUpdate(body, { version: '4.16.2' }, { version: '4.16.2' });
  during.request.object.status.availableUpdates = null;
  during.request.oldObject.status.availableUpdates = null;
  t.equal(review(reviewClusterVersionUpdate(during, untouchable, ENFORCE)).allowed, true, 'the same version, no longer listed, is no new target');

  const otherTarget = withDesiredUpdate(body, { version: '4.16.3', image: IMAGE_4_16_3 });
  t.equal(review(reviewClusterVersionUpdate(otherTarget, inputs([]), ENFORCE)).allowed, false, 'a new target on top of a channel change is gated');
});

t.test('clearing the update and mode Preflight are allowed without reading any state', async (t) => {
  for (const name of ['clear-update', 'preflight-mode']) {
    const body = fixture(name);
    const out = reviewClusterVersionUpdate(body, untouchable, ENFORCE);
    checkEnvelope(t, out, body.request.uid);
    t.equal(review(out).allowed, true, name);
    t.equal(out.error, undefined, name);
  }
  const nulled = withDesiredUpdate(fixture('clear-update'), null);
  t.equal(review(reviewClusterVersionUpdate(nulled, untouchable, ENFORCE)).allowed, true, 'desiredUpdate: null');
  const empty = withDesiredUpdate(fixture('clear-update'), { force: true });
  t.equal(review(reviewClusterVersionUpdate(empty, untouchable, ENFORCE)).allowed, true, 'neither image nor version: nothing to gate');
});

t.test('dropping mode Preflight starts the update, which is gated', async (t) => {
  const preflight = fixture('preflight-mode');
  const start = withDesiredUpdate(preflight, { version: '4.16.2', image: IMAGE_4_16_2, force: false }, preflight.request.object.spec.desiredUpdate);
  const out = reviewClusterVersionUpdate(start, inputs([]), ENFORCE);
  t.equal(review(out).allowed, false);
  t.match(messageOf(out), 'no PreflightValidationOCP validates release');
});

t.test('CREATE, DELETE, other resources and the status subresource are not gated', async (t) => {
  const base = fixture('update-to-4.16.2-by-image');
  const create = structuredClone(base);
  create.request.operation = 'CREATE';
  create.request.oldObject = null;
  const del = structuredClone(base);
  del.request.operation = 'DELETE';
  del.request.object = null;
  const status = structuredClone(base);
  status.request.subResource = 'status';
  const other = structuredClone(base);
  other.request.resource = { group: 'config.openshift.io', version: 'v1', resource: 'clusteroperators' };
  for (const [name, body] of Object.entries({ create, del, status, other })) {
    const out = reviewClusterVersionUpdate(body, untouchable, ENFORCE);
    checkEnvelope(t, out, base.request.uid);
    t.equal(review(out).allowed, true, name);
  }
});

// ---------------------------------------------------------------------------------------------
// Envelope
// ---------------------------------------------------------------------------------------------

t.test('the uid is echoed in every kind of answer', async (t) => {
  const failing = inputs([pfvo('ocp-4-16-2', IMAGE_4_16_2, [['gpu-operator', 'nvidia-gds', 'False', NO_MAPPING]])]);
  const cases: [string, GateInputs, GatePolicy][] = [
    ['allowed', inputs([pfvo('ocp-4-16-2', IMAGE_4_16_2, ALL_TRUE)]), ENFORCE],
    ['denied', failing, ENFORCE],
    ['warned', failing, WARN],
    ['failed closed', untouchable, ENFORCE],
  ];
  for (const [name, inp, policy] of cases) {
    const body = fixture('update-to-4.16.2-by-image');
    body.request.uid = `uid-${name.replace(' ', '-')}-42`;
    checkEnvelope(t, reviewClusterVersionUpdate(body, inp, policy), body.request.uid);
  }
});

t.test('a malformed AdmissionReview gets 400 with a Status saying what is wrong', async (t) => {
  const good = fixture('update-to-4.16.2-by-image');
  const edit = (f: (r: Json) => void) => {
    const r = structuredClone(good);
    f(r);
    return r;
  };
  const cases: [string, unknown, RegExp][] = [
    ['null', null, /body must be a JSON object.*not null/],
    ['an array', [good], /not an array/],
    ['a string', 'AdmissionReview', /not string/],
    ['v1beta1', edit((r) => (r.apiVersion = 'admission.k8s.io/v1beta1')), /apiVersion must be admission\.k8s\.io\/v1, not "admission\.k8s\.io\/v1beta1"/],
    ['wrong kind', edit((r) => (r.kind = 'ConversionReview')), /kind must be AdmissionReview/],
    ['no request', edit((r) => delete r.request), /request must be an object, not undefined/],
    ['no uid', edit((r) => delete r.request.uid), /request\.uid must be a non-empty string/],
    ['empty uid', edit((r) => (r.request.uid = '')), /request\.uid must be a non-empty string/],
    ['no resource', edit((r) => delete r.request.resource), /request\.resource must be an object/],
    ['bad operation', edit((r) => (r.request.operation = 'PATCH')), /request\.operation must be one of CREATE, UPDATE, DELETE, CONNECT/],
    ['UPDATE without object', edit((r) => delete r.request.object), /request\.object must be an object for UPDATE/],
    ['UPDATE with a string object', edit((r) => (r.request.object = 'version')), /request\.object must be an object for UPDATE, not string/],
    ['UPDATE without oldObject', edit((r) => (r.request.oldObject = null)), /request\.oldObject must be an object for UPDATE, not null/],
    ['desiredUpdate not an object', edit((r) => (r.request.object.spec.desiredUpdate = '4.16.2')), /spec\.desiredUpdate of the new object must be an object/],
  ];
  for (const [name, body, message] of cases) {
    const out = reviewClusterVersionUpdate(body, untouchable, ENFORCE);
    t.equal(out.status, 400, name);
    const s = out.body as Status;
    t.match(s, { kind: 'Status', apiVersion: 'v1', status: 'Failure', reason: 'BadRequest', code: 400 }, name);
    t.match(s.message, /^malformed AdmissionReview: /, name);
    t.match(s.message, message, name);
  }
});

// ---------------------------------------------------------------------------------------------
// What counts as verified
// ---------------------------------------------------------------------------------------------

t.test('a Module created after the validation is not verified', async (t) => {
  const body = fixture('update-to-4.16.2-by-image');
  const late = mod('net', 'mlnx-ofed', '2024-07-18T10:30:00Z');
  const early = mod('net', 'ice-oot', '2024-07-18T09:30:00Z');
  const v = pfvo('ocp-4-16-2', IMAGE_4_16_2, ALL_TRUE);
  const out = reviewClusterVersionUpdate(body, inputs([v], [...MODULES, late]), ENFORCE);
  t.equal(review(out).allowed, false);
  t.match(messageOf(out), 'has 1 of 4 Modules not verified: net/mlnx-ofed: created after the validation (2024-07-18T10:30:00Z), not validated yet');
  const notYet = reviewClusterVersionUpdate(body, inputs([v], [...MODULES, early, mod('net', 'no-time')]), ENFORCE);
  t.match(messageOf(notYet), 'net/ice-oot: not validated yet');
  t.match(messageOf(notYet), 'net/no-time: not validated yet');
});

t.test('entries of Modules that no longer exist are ignored, and no Modules at all is verified', async (t) => {
  const body = fixture('update-to-4.16.2-by-image');
  const v = pfvo('ocp-4-16-2', IMAGE_4_16_2, [...ALL_TRUE, ['gone', 'old-driver', 'False', NO_MAPPING]]);
  t.equal(review(reviewClusterVersionUpdate(body, inputs([v]), ENFORCE)).allowed, true);
  const none = review(reviewClusterVersionUpdate(body, inputs([], []), ENFORCE));
  t.equal(none.allowed, true, 'no Modules: nothing can fail, with or without a validation');
  t.match(none.auditAnnotations, { verdict: 'NoModules' });
});

t.test('more than 3 failing Modules: the first 3, worst first, and how many more, in under 1 KiB', async (t) => {
  const body = fixture('update-to-4.16.2-by-image');
  const modules = Array.from({ length: 8 }, (_, i) => mod('drivers', `mod-${i}`));
  const long = `${NO_MAPPING} `.repeat(20);
  const entries: Entry[] = modules.map((m, i) => ['drivers', m.metadata.name, i < 2 ? 'Unknown' : i < 7 ? 'False' : 'True', long]);
  const out = reviewClusterVersionUpdate(body, inputs([pfvo('ocp-4-16-2', IMAGE_4_16_2, entries)], modules), ENFORCE);
  const m = messageOf(out);
  t.match(m, 'has 7 of 8 Modules not verified');
  t.match(m, /drivers\/mod-2: .*drivers\/mod-3: .*drivers\/mod-4: .*; and 4 more/, 'failures before pending ones');
  t.notMatch(m, 'drivers/mod-0', 'pending ones come after failures');
  t.match(m, '…', 'long reasons are cut');
  const shown = /drivers\/mod-2: (.*?); drivers\/mod-3/.exec(m)?.[1] ?? '';
  t.ok(shown.length >= 100 && shown.length < 200, `reasons are cut only as far as the budget needs (${shown.length})`);
  t.ok(Buffer.byteLength(m) <= MAX_MESSAGE_BYTES, `${Buffer.byteLength(m)} bytes`);
  t.match(m, 'kubectl get pfvo ocp-4-16-2 -o yaml', 'the fix survives the cut');
  t.match(m, 'To override', 'the override survives the cut');

  const hugeNames = Array.from({ length: 5 }, (_, i) => mod('n'.repeat(63), `${'m'.repeat(240)}-${i}`));
  const hugeEntries: Entry[] = hugeNames.map((x) => [x.metadata.namespace!, x.metadata.name, 'False', long]);
  const huge = messageOf(reviewClusterVersionUpdate(body, inputs([pfvo('ocp-4-16-2', IMAGE_4_16_2, hugeEntries)], hugeNames), ENFORCE));
  t.ok(Buffer.byteLength(huge) <= MAX_MESSAGE_BYTES, `very long names too: ${Buffer.byteLength(huge)} bytes`);
  t.match(huge, /^kmm-preflight refuses the update to 4\.16\.2/);
});

t.test('a matching object whose status is behind its generation, or not there yet, is not verified', async (t) => {
  const body = fixture('update-to-4.16.2-by-image');
  const behind = reviewClusterVersionUpdate(body, inputs([pfvo('ocp-4-16-2', IMAGE_4_16_2, ALL_TRUE, { generation: 3, observedGeneration: 2 })]), ENFORCE);
  t.equal(review(behind).allowed, false);
  t.match(messageOf(behind), 'PreflightValidationOCP ocp-4-16-2 is validating its changed spec (generation 3, status for 2)');
  t.match(messageOf(behind), 'kubectl wait pfvo/ocp-4-16-2 --for=condition=Verified');
  const fresh = reviewClusterVersionUpdate(body, inputs([pfvo('ocp-4-16-2', IMAGE_4_16_2, [], { observedGeneration: null })]), ENFORCE);
  t.match(messageOf(fresh), 'PreflightValidationOCP ocp-4-16-2 has not started validating yet');
});

t.test('an object being deleted is not verified, and loses to another match', async (t) => {
  const body = fixture('update-to-4.16.2-by-image');
  const deleting = pfvo('newer', IMAGE_4_16_2, ALL_TRUE, { deleting: true, created: '2024-07-18T09:30:00Z' });
  const alone = reviewClusterVersionUpdate(body, inputs([deleting]), ENFORCE);
  t.equal(review(alone).allowed, false);
  t.match(messageOf(alone), 'PreflightValidationOCP newer is being deleted');
  t.match(messageOf(alone), 'kubectl apply -f -', 'says what to create instead');
  const older = pfvo('older', IMAGE_4_16_2, ALL_TRUE, { created: '2024-07-17T09:00:00Z' });
  t.equal(review(reviewClusterVersionUpdate(body, inputs([deleting, older]), ENFORCE)).allowed, true);
});

t.test('of several matching objects the newest decides', async (t) => {
  const body = fixture('update-to-4.16.2-by-image');
  const old = pfvo('first-try', IMAGE_4_16_2, ALL_TRUE, { created: '2024-07-17T09:00:00Z' });
  const newer = pfvo('second-try', IMAGE_4_16_2, [...ALL_TRUE.slice(1), ['gpu-operator', 'nvidia-gds', 'False', NO_MAPPING]], { created: '2024-07-18T09:00:00Z' });
  const out = reviewClusterVersionUpdate(body, inputs([newer, old]), ENFORCE);
  t.equal(review(out).allowed, false);
  t.match(messageOf(out), 'PreflightValidationOCP second-try');
  const reversed = reviewClusterVersionUpdate(body, inputs([old, newer]), ENFORCE);
  t.match(messageOf(reversed), 'PreflightValidationOCP second-try', 'whatever the order of the list');
});

t.test("the object's own explanation is quoted when its kernel could not be resolved", async (t) => {
  const body = fixture('update-to-4.16.2-by-image');
  const v = pfvo('ocp-4-16-2', IMAGE_4_16_2, []);
  v.status = summarize(undefined, { modules: [], generation: 1, kernelProblem: { reason: 'NoDriverToolkit', message: 'release lists no driver-toolkit image', retrying: false } }, VALIDATED_AT);
  const m = messageOf(reviewClusterVersionUpdate(body, inputs([v]), ENFORCE));
  t.match(m, 'has 3 of 3 Modules not verified');
  t.match(m, "Verified condition says: NoDriverToolkit: release lists no driver-toolkit image");
});

// ---------------------------------------------------------------------------------------------
// Failure
// ---------------------------------------------------------------------------------------------

t.test('an internal error fails closed, saying so', async (t) => {
  const body = fixture('update-to-4.16.2-by-image');
  const boom = new Error('index corrupted');
  const broken: GateInputs = { ...inputs([]), validations: () => { throw boom; } };
  const out = reviewClusterVersionUpdate(body, broken, ENFORCE);
  checkEnvelope(t, out, body.request.uid);
  t.equal(out.error, boom, 'the error is handed back for the log');
  const r = review(out);
  t.equal(r.allowed, false);
  t.match(r.status, { code: 500, reason: 'InternalError' });
  t.match(r.status?.message, 'kmm-preflight failed internally while checking this update (index corrupted)');
  t.match(r.status?.message, "check the kmm-preflight server's log");
  t.match(r.status?.message, 'Retry');

  const warned = review(reviewClusterVersionUpdate(body, broken, WARN));
  t.equal(warned.allowed, true, 'warn mode lets it through');
  t.match(warned.warnings?.[0], 'the gate failed internally and did not check this update');

  const forced = withDesiredUpdate(body, { image: IMAGE_4_16_2, force: true });
  t.equal(review(reviewClusterVersionUpdate(forced, broken, ENFORCE)).allowed, true, 'an honoured force lets it through');
  t.equal(review(reviewClusterVersionUpdate(forced, broken, ENFORCE_NO_FORCE)).allowed, false, 'an ignored force does not');
});
