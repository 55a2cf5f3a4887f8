import t from 'tap';
import { countsOf, nextEntry, summarize } from '../../src/controller/status.ts';

const key = { namespace: 'ns', name: 'gpu' };
const t0 = new Date('2026-11-21T10:00:00Z');
const t1 = new Date('2026-11-21T10:05:00Z');

t.test('lastTransitionTime moves only when status or stage really changes', async (t) => {
  const a = nextEntry(undefined, key, { verificationStatus: 'Unknown', verificationStage: 'Image', statusReason: 'waiting' }, t0);
  t.equal(a.lastTransitionTime, '2026-11-21T10:00:00Z');
  const same = nextEntry(a, key, { verificationStatus: 'Unknown', verificationStage: 'Image', statusReason: 'waiting' }, t1);
  t.equal(same, a, 'no change: the same object, so no write');
  const reasonOnly = nextEntry(a, key, { verificationStatus: 'Unknown', verificationStage: 'Image', statusReason: 'still waiting' }, t1);
  t.equal(reasonOnly.lastTransitionTime, '2026-11-21T10:00:00Z', 'a new reason is not a transition');
  const done = nextEntry(a, key, { verificationStatus: 'True', verificationStage: 'Done', statusReason: 'ok' }, t1);
  t.equal(done.lastTransitionTime, '2026-11-21T10:05:00Z');
});

t.test('counts and conditions follow the entries', async (t) => {
  const e = (name: string, s: 'True' | 'False' | 'Error' | 'Unknown') =>
    nextEntry(undefined, { namespace: 'ns', name }, { verificationStatus: s, verificationStage: s === 'True' ? 'Done' : 'Requeued', statusReason: s }, t0);
  const mods = [e('a', 'True'), e('b', 'False'), e('c', 'Error'), e('d', 'Unknown')];
  t.same(countsOf(mods), { total: 4, verified: 1, failed: 1, error: 1, pending: 1 });
  const s = summarize(undefined, { modules: mods, generation: 3, kernelVersion: '6.1.0-18-amd64' }, t0);
  t.match(s.conditions, [
    { type: 'Verified', status: 'False', reason: 'ModulesFailed', observedGeneration: 3, message: /1 of 4 Modules verified; failed: ns\/b; errors \(retried\): ns\/c; 1 pending/ },
    { type: 'Progressing', status: 'True', reason: 'Validating' },
  ]);
  t.equal(s.observedGeneration, 3);
  const allOk = summarize(s, { modules: [e('a', 'True')], generation: 3, kernelVersion: '6.1.0-18-amd64' }, t1);
  t.match(allOk.conditions, [
    { type: 'Verified', status: 'True', reason: 'AllModulesVerified', lastTransitionTime: '2026-11-21T10:05:00Z' },
    { type: 'Progressing', status: 'False', reason: 'Completed' },
  ]);
  const again = summarize(allOk, { modules: [e('a', 'True')], generation: 3, kernelVersion: '6.1.0-18-amd64' }, new Date('2026-11-21T11:00:00Z'));
  t.equal(again.conditions![0]!.lastTransitionTime, '2026-11-21T10:05:00Z', 'condition times move only when their status changes');
  t.match(summarize(undefined, { modules: [], generation: 1 }, t0).conditions, [{ type: 'Verified', status: 'True', reason: 'NoModules' }]);
});

t.test('an unknown kernel (OCP release not resolved) keeps Verified False with the reason', async (t) => {
  const s = summarize(undefined, { modules: [], generation: 1, kernelProblem: { reason: 'NoDriverToolkit', message: 'release x lists no driver-toolkit', retrying: false } }, t0);
  t.match(s.conditions, [
    { type: 'Verified', status: 'False', reason: 'NoDriverToolkit' },
    { type: 'Progressing', status: 'False', reason: 'KernelUnknown' },
  ]);
});
