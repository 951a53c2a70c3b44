/* moed-fixture.c: not written yet. */
