"""English function words that word-substitution attacks never replace (nor propose as substitutes).

BERT-Attack, Co-Attack and SGA filter a fixed list of function words and punctuation; ours is written for this
project: articles, pronouns, prepositions, conjunctions, auxiliaries, quantifiers and punctuation. Content words
(nouns, adjectives, verbs of action, numbers) stay attackable. Pass ``stop_words=[...]`` to an attack to replace it.
"""

from __future__ import annotations

_WORDS = """
a an the this that these those some any each every either neither no none all both half
i me my mine myself you your yours yourself yourselves he him his himself she her hers herself it its itself
we us our ours ourselves they them their theirs themselves one ones someone somebody something anyone anybody
anything everyone everybody everything nobody nothing whoever whatever whichever who whom whose which what
about above across after against along amid among amongst around as at before behind below beneath beside besides
between beyond by despite down during except for from in inside into like near of off on onto out outside over
past per since than through throughout till to toward towards under underneath unlike until up upon via with within
without
and but or nor so yet because although though unless whereas while if whether once then else also too
am is are was were be been being have has had having do does did doing done will would shall should can could
may might must ought cannot
not very just only even still already again ever never always often sometimes here there where when why how
more most less least much many few several such own same other another own quite rather really
's 're 've 'd 'll 'm n't
, . ; : ! ? - -- ( ) [ ] { } " ' ` ... / \\ & * # @ % + = < > | ~ ^ _
"""

STOP_WORDS: frozenset[str] = frozenset(_WORDS.split())
