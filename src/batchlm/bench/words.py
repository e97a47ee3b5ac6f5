"""Built-in text: the seed-style user prompts, and the vocabulary random prompts are drawn from."""

from __future__ import annotations

# Everyday requests of very different lengths, in the spirit of the seed client's prompt list.
# The seed multiplies each prompt (see --prompt-repeat) to make long inputs.
BUILTIN_PROMPTS: tuple[str, ...] = (
    "Hello!",
    "Which river is the longest in Africa?",
    "Write a limerick about a cat that learns to code.",
    "Explain how a rainbow forms, as if to a six-year-old.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Give a one-paragraph summary of the story of Odysseus returning home.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle. Make it at least "
    "four hundred words long.",
    "Translate 'Where is the train station?' into Italian, Dutch, Portuguese and Korean.",
    "List twelve surprising facts about honeybees.",
    "Write a detailed essay on how the printing press changed science, religion and politics in Europe.",
    "Why do we dream?",
    "How do I bake a loaf of sourdough bread at home?",
    "Is mathematics discovered or invented?",
    "What would happen if the Moon suddenly disappeared?",
    "Why is sea water salty?",
    "Who painted the ceiling of the Sistine Chapel?",
    "Describe in detail how vaccines train the immune system.",
    "Suggest fifteen names for a bakery that also sells books.",
    "Plan a five-day vegetarian menu with breakfast, lunch and dinner for an athlete.",
    "Explain the difference between weather and climate in plain words.",
    "Design a twelve-week training plan for a first marathon.",
    "What are the benefits of learning a second language as an adult?",
    "How does public-key cryptography keep a message secret?",
)

# Common English words that most BPE tokenizers encode as one token each (with a leading space).
_VOCABULARY_TEXT = """
    time year people way day man thing woman life child world school state family student group country
    problem hand part place case week company system program question work government number night point
    home water room mother area money story fact month lot right study book eye job word business issue
    side kind head house service friend father power hour game line end member law car city community name
    president team minute idea kid body information back parent face others level office door health person
    art war history party result change morning reason research girl guy moment air teacher force education
    foot boy age policy process music market sense nation plan college interest death experience effect use
    class control care field development role effort rate heart drug show leader light voice wife police mind
    price report decision son view relationship town road arm difference value building action model season
    society tax director position player record paper space ground form event official matter center couple
    site project activity star table need court oil situation cost industry figure street image phone data
    picture practice piece land product doctor wall patient worker news test movie north love support
    technology step baby computer type attention film tree source organization hair window evidence
    population site garden river bridge stone winter summer autumn spring ocean island forest mountain valley
    """
VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(_VOCABULARY_TEXT.split()))
